//! `fd-node`: run one member of an fd federation.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fd_node::config::{EXAMPLE_CONFIG, NodeConfig};
use fd_node::export::ExportFormat;
use fd_net::keyfile;
use fd_node::runtime;

#[derive(Parser)]
#[command(
    name = "fd-node",
    version,
    about = "A member of a peer-to-peer federated distillation federation: trains its student on private data and shares only logits on a public set.",
    after_long_help = EXAMPLE_CONFIG
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the federation through the coordinator and run every round.
    #[command(after_long_help = EXAMPLE_CONFIG)]
    Run {
        /// The node's TOML config (see `fd-node help run`).
        #[arg(long, short)]
        config: PathBuf,
        /// Run the rounds without peers (the no-collaboration baseline).
        #[arg(long)]
        isolated: bool,
    },
    /// Write a commented starter config (and create its key) in a folder.
    Init {
        /// Folder to write `node.toml` into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Print the PeerId of the node's key (creating the key if missing).
    PeerId {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the federation's membership, this node's checkpoint and its last rounds.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// How many of the last rounds to show.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Check that this member can reach its federation: per peer (coordinator,
    /// bootstrap peers, members found through them), reachable or not, over
    /// which transport, the time to connect, and what to open in which
    /// firewall when nothing works. Exits 1 when a peer is unreachable.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds to wait for each peer.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
    /// Write a new pre-shared key (libp2p pnet `swarm.key` format, mode 0600)
    /// for a closed federation; give every member a copy and set `psk_file`.
    GenPsk {
        /// File to create; refused if it exists.
        #[arg(long, default_value = "swarm.key")]
        out: PathBuf,
    },
    /// Export the student of the node's checkpoint as a SafeTensors model
    /// (`model.safetensors` + `model.json`) in a folder.
    Export {
        #[arg(long, short)]
        config: PathBuf,
        /// Folder to write into (created if missing; its two files are replaced).
        #[arg(long)]
        out: PathBuf,
        /// f32 (exact), f16 (half the size) or int8 (per-channel symmetric, ~4× smaller).
        #[arg(long, default_value = "f32")]
        format: ExportFormat,
        /// best: the student with the best validation accuracy kept so far
        /// (`[rollback] best_file`); current: the last round's (`checkpoint_file`).
        #[arg(long, default_value = "best")]
        which: fd_node::export::Which,
    },
    /// Measure an exported model: accuracy (per class, confusion matrix),
    /// latency at batch 1, throughput at batch 64, file size, peak memory, energy.
    Evaluate {
        /// Folder written by `fd-node export`.
        #[arg(long)]
        model: PathBuf,
        /// TOML file with the data source (a node config, or just the keys of
        /// its `[data]` table); its test split is used. Default: the source
        /// recorded in model.json.
        #[arg(long)]
        data: Option<PathBuf>,
        /// flex, ndarray, wgpu or wgpu-cpu.
        #[arg(long, default_value = "flex")]
        device: String,
        /// Also write the report as JSON here (default: <model>/evaluation-<device>.json).
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        latency: fd_node::evaluate::LatencyArgs,
    },
    /// Distil the member's federated student into a smaller one (response
    /// and feature losses, optionally progressive) and export it.
    Compress(fd_node::compress::CompressArgs),
    /// A/B-compare two exported models on the same samples: accuracy of
    /// each, the paired difference's 95 % CI and McNemar's p, latency.
    Compare(fd_node::compare::CompareArgs),
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists, so every thread starts flushing (see fpenv).
    fd_node::fpenv::flush_denormals();
    fd_node::fpenv::install_global_pool();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Compress(args) => fd_node::compress::run_cli(args)
            .map(drop)
            .map_err(|e| anyhow::anyhow!("{e}")),
        Command::Compare(args) => fd_node::compare::run_cli(args)
            .map(drop)
            .map_err(|e| anyhow::anyhow!("{e}")),
        Command::Export {
            config,
            out,
            format,
            which,
        } => {
            let config = NodeConfig::from_file(&config)?;
            let card = fd_node::export::export_which(&config, which, format, &out)?;
            println!(
                "exported {} ({}, round {}, test accuracy {}, validation accuracy {}) to {}: {} bytes, sha256 {}",
                card.architecture_name,
                card.format,
                card.round.map_or("-".into(), |r| r.to_string()),
                card.test_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
                card.validation_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
                out.display(),
                card.weights_bytes,
                card.weights_sha256
            );
            Ok(())
        }
        Command::Evaluate {
            model,
            data,
            device,
            json,
            latency,
        } => {
            use fd_node::evaluate::{data_source_from_file, evaluate_exported, write_json_report};
            let kind: fd_node::device::DeviceKind = serde_json::from_value(
                serde_json::Value::String(device.clone()),
            )
            .map_err(|_| {
                anyhow::anyhow!("--device {device:?}: expected flex, ndarray, wgpu or wgpu-cpu")
            })?;
            let splits = match &data {
                Some(path) => Some(
                    data_source_from_file(path)?
                        .load()
                        .with_context(|| format!("--data {}", path.display()))?,
                ),
                None => None,
            };
            let report = evaluate_exported(
                &model,
                splits.as_ref().map(|s| &s.test),
                kind,
                latency.options(),
            )?;
            print!("{report}");
            let path =
                json.unwrap_or_else(|| model.join(format!("evaluation-{}.json", kind.name())));
            write_json_report(&path, &report).map_err(anyhow::Error::msg)?;
            println!("report      {}", path.display());
            Ok(())
        }
        Command::Run { config, isolated } => {
            let config = NodeConfig::from_file(&config)?;
            let (key, created) = keyfile::load_or_create(&config.key_file)?;
            if created {
                tracing::info!(path = %config.key_file.display(), "created a new key");
            }
            println!(
                "{} peer id {}",
                config.name,
                runtime::peer_id_string(&key.public_key())
            );
            let rt = fd_node::fpenv::runtime()?;
            let metrics = if isolated {
                rt.block_on(runtime::run_isolated(&config, &key))?
            } else {
                rt.block_on(runtime::run_federated(config.clone(), key, None))?
            };
            for m in &metrics {
                println!(
                    "round {:>3}  accuracy {:.4}  local {:.4}  bytes sent {:>10}  shares sent {}  aggregated {}  rejected {}",
                    m.round,
                    m.test_accuracy,
                    m.local_accuracy,
                    m.bytes_sent,
                    m.shares_sent,
                    m.shares_aggregated,
                    m.shares_rejected
                );
            }
            Ok(())
        }
        Command::Init { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join("node.toml");
            anyhow::ensure!(
                !path.exists(),
                "{} already exists; not overwriting it",
                path.display()
            );
            std::fs::write(&path, EXAMPLE_CONFIG)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let config = NodeConfig::from_file(&path)?;
            let (key, _) = keyfile::load_or_create(&config.key_file)?;
            println!(
                "wrote {} (edit `coordinator` and [partition])",
                path.display()
            );
            println!("peer id {}", runtime::peer_id_string(&key.public_key()));
            Ok(())
        }
        Command::Status { config, rounds } => status(&config, rounds),
        Command::Doctor {
            config,
            timeout_secs,
        } => {
            let config = NodeConfig::from_file(&config)?;
            let key = keyfile::load(&config.key_file)
                .with_context(|| format!("key_file {}", config.key_file.display()))?;
            println!(
                "{} peer id {}",
                config.name,
                runtime::peer_id_string(&key.public_key())
            );
            let timeout = std::time::Duration::from_secs(timeout_secs.max(1));
            let probes = fd_node::fpenv::runtime()?
                .block_on(fd_node::doctor::diagnose(&config, &key, timeout))?;
            for probe in &probes {
                println!("{probe}");
            }
            let unreachable = probes
                .iter()
                .filter(|p| matches!(p.outcome, fd_node::doctor::Outcome::Unreachable { .. }))
                .count();
            anyhow::ensure!(
                unreachable == 0,
                "{unreachable} of {} peers unreachable",
                probes.len()
            );
            if probes.is_empty() {
                println!("no coordinator, bootstrap peer or member to check in this config");
            }
            Ok(())
        }
        Command::GenPsk { out } => {
            anyhow::ensure!(
                !out.exists(),
                "{} already exists; not overwriting a key members may hold",
                out.display()
            );
            fd_data::fsutil::write_atomic(&out, fd_net::new_psk_text().as_bytes(), 0o600)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {} (mode 0600): copy it to every member and set psk_file",
                out.display()
            );
            Ok(())
        }
        Command::PeerId { config } => {
            let config = NodeConfig::from_file(&config)?;
            let (key, _) = keyfile::load_or_create(&config.key_file)?;
            println!("{}", runtime::peer_id_string(&key.public_key()));
            Ok(())
        }
    }
}

/// `fd-node status`: what this node knows without asking the network.
fn status(path: &std::path::Path, rounds: usize) -> anyhow::Result<()> {
    let config = NodeConfig::from_file(path)?;
    let me = match keyfile::load(&config.key_file) {
        Ok(key) => runtime::peer_id_string(&key.public_key()),
        Err(e) => format!("(no key: {e})"),
    };
    println!("node        {} ({me})", config.name);
    println!(
        "federation  {}, {} rounds, public set {} samples, {} per round",
        config.federation.id,
        config.federation.rounds,
        config.federation.public_size,
        config.federation.subset_size
    );
    match (&config.coordinator, &config.federation.schedule) {
        (Some(c), _) => println!("clock       coordinator {c}"),
        (None, Some(s)) => println!(
            "clock       schedule: round 1 opens at {} (Unix s), every {} s, shares until +{} s; now round {}",
            s.start_unix,
            s.round_secs,
            s.share_deadline_secs,
            s.current_round(fd_data::fsutil::now_unix_ms())
        ),
        (None, None) => println!("clock       none (isolated)"),
    }
    if config.federation.members.is_empty() {
        println!(
            "members     open federation (no member list: anyone with the public set may join)"
        );
    } else {
        println!(
            "members     {} listed; connections from others are refused",
            config.federation.members.len()
        );
        for m in &config.federation.members {
            let mark = if *m == me { "  (this node)" } else { "" };
            println!("            {m}{mark}");
        }
    }
    println!(
        "network     {}{}",
        if config.psk_file.is_some() {
            "closed (pre-shared key)"
        } else {
            "no pre-shared key"
        },
        if config.bootstrap.is_empty() {
            String::new()
        } else {
            format!(", {} bootstrap peers", config.bootstrap.len())
        }
    );
    match config.checkpoint_file.as_deref() {
        Some(path) => match fd_node::checkpoint::Checkpoint::load(path) {
            Ok(Some(c)) => println!(
                "checkpoint  round {} done, weights {} ({})",
                c.round,
                c.weights_digest,
                path.display()
            ),
            Ok(None) => println!("checkpoint  none yet ({})", path.display()),
            Err(e) => println!("checkpoint  unreadable: {e}"),
        },
        None => println!("checkpoint  off"),
    }
    let Some(metrics) = config.metrics_file.as_deref() else {
        println!("rounds      no metrics_file configured");
        return Ok(());
    };
    let text = match std::fs::read_to_string(metrics) {
        Ok(text) => text,
        Err(_) => {
            println!("rounds      none yet ({})", metrics.display());
            return Ok(());
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    println!(
        "rounds      {} recorded in {}",
        lines.len(),
        metrics.display()
    );
    for line in &lines[lines.len().saturating_sub(rounds)..] {
        // `dp_epsilon` is a local field of members with [dp] (not in RoundMetrics).
        let epsilon = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("dp_epsilon").and_then(serde_json::Value::as_f64))
            .map_or(String::new(), |e| format!("  ε {e:.3}"));
        match serde_json::from_str::<fd_protocol::RoundMetrics>(line) {
            Ok(m) => println!(
                "  round {:>3}  accuracy {:.4} (local {:.4})  aggregated {}  rejected {}  {}{epsilon}",
                m.round,
                m.test_accuracy,
                m.local_accuracy,
                m.shares_aggregated,
                m.shares_rejected,
                if m.rolled_back {
                    "distilled, rolled back"
                } else if m.distilled {
                    "distilled"
                } else {
                    "quorum not met"
                }
            ),
            Err(e) => println!("  unreadable line: {e}"),
        }
    }
    Ok(())
}

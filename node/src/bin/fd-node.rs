//! `fd-node`: run one member of an fd federation.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fd_node::config::{EXAMPLE_CONFIG, NodeConfig};
use fd_node::{keyfile, runtime};

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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
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
        Command::PeerId { config } => {
            let config = NodeConfig::from_file(&config)?;
            let (key, _) = keyfile::load_or_create(&config.key_file)?;
            println!("{}", runtime::peer_id_string(&key.public_key()));
            Ok(())
        }
    }
}

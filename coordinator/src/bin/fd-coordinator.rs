//! `fd-coordinator`: the optional rendezvous of an fd federation.

use std::path::PathBuf;

use clap::Parser;
use fd_coordinator::{CoordinatorConfig, EXAMPLE_CONFIG};
use fd_net::keyfile;

#[derive(Parser)]
#[command(
    name = "fd-coordinator",
    version,
    about = "Rendezvous for an fd federation: bootstrap, manifest, round clock, metrics. Never sees data or logits.",
    after_long_help = EXAMPLE_CONFIG
)]
struct Cli {
    /// The coordinator's TOML config (see --help).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,libp2p=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = CoordinatorConfig::from_file(&cli.config)?;
    let (key, _) = keyfile::load_or_create(&config.key_file)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let rounds = rt.block_on(fd_coordinator::run(config, key, None))?;
    for (round, metrics) in rounds {
        let n = metrics.len().max(1) as f64;
        let mean = metrics.iter().map(|m| m.test_accuracy).sum::<f64>() / n;
        println!(
            "round {round:>3}  members reported {}  mean accuracy {mean:.4}",
            metrics.len()
        );
    }
    Ok(())
}

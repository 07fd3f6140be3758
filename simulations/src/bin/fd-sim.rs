//! `fd-sim`: run fd federations on one machine.

use clap::{Parser, Subcommand};
use fd_sim::quickstart::{self, QuickstartOptions};

#[derive(Parser)]
#[command(
    name = "fd-sim",
    version,
    about = "Simulation harness for fd federations on one machine."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One coordinator and N members on 127.0.0.1 over real libp2p; prints a per-round table.
    Quickstart(QuickstartOptions),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Quickstart(options) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(quickstart::run(options))?;
        }
    }
    Ok(())
}

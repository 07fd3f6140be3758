//! `fd-sim`: run fd federations on one machine.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use fd_sim::bench::{self, BenchOptions};
use fd_sim::experiment::EXAMPLE_EXPERIMENT;
use fd_sim::quickstart::{self, QuickstartOptions};
use fd_sim::sweep::{self, RunOptions};

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
    /// Runs an experiment file (every cell of its [sweep]); `fd-sim example` prints an annotated one.
    Run {
        /// The experiment (TOML).
        experiment: PathBuf,
        #[command(flatten)]
        options: RunOptions,
    },
    /// Prints an annotated experiment file with every field and its default.
    Example,
    /// Measures bytes, throughput, round breakdown, scale and codec speed; writes docs/performance.md.
    Bench(BenchOptions),
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists, so every thread starts flushing (see fpenv).
    fd_node::fpenv::flush_denormals();
    fd_node::fpenv::install_global_pool();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = fd_node::fpenv::runtime;
    match Cli::parse().command {
        Command::Quickstart(options) => {
            rt()?.block_on(quickstart::run(options))?;
        }
        Command::Run {
            experiment,
            options,
        } => {
            rt()?.block_on(sweep::run_file(&experiment, &options))?;
        }
        Command::Example => print!("{EXAMPLE_EXPERIMENT}"),
        Command::Bench(options) => bench::run(&options)?,
    }
    Ok(())
}

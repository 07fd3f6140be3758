//! `fd-sim run`: an experiment file, expanded into its sweep cells, each run
//! into its own folder.
//!
//! Cells run one after another in a fixed order. A cell whose folder holds a
//! `summary.json` is finished (that file is written last, atomically) and is
//! skipped on a re-run, so an interrupted sweep resumes where it stopped and
//! a finished cell is never rewritten. After all cells, `sweep.md` compares
//! them and `sweep_accuracy.svg` overlays their accuracy curves.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use indicatif::MultiProgress;

use crate::experiment::{self, Network};
use crate::output::{self, Summary};
use crate::runner::{self, Progress};

/// Command-line overrides of `fd-sim run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunOptions {
    /// Results folder; each experiment writes into <out>/<name>/.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Carry fd shares over `memory` or `libp2p` (overrides the file).
    #[arg(long, value_parser = parse_network)]
    pub network: Option<Network>,
    /// Members computing at once (overrides the file).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// No progress bars (e.g. in logs).
    #[arg(long)]
    pub quiet: bool,
}

fn parse_network(s: &str) -> Result<Network, String> {
    match s {
        "memory" => Ok(Network::Memory),
        "libp2p" => Ok(Network::Libp2p),
        other => Err(format!("unknown network {other:?}: memory | libp2p")),
    }
}

/// What happened to one cell.
#[derive(Debug, Clone)]
pub struct CellOutcome {
    pub cell: String,
    pub dir: PathBuf,
    /// Finished by an earlier run, not run again.
    pub skipped: bool,
    pub summary: Summary,
}

/// Runs every cell of the experiment in `path`.
pub async fn run_file(path: &Path, options: &RunOptions) -> anyhow::Result<Vec<CellOutcome>> {
    let mut table = experiment::load(path)?;
    if let Some(network) = options.network {
        let name = match network {
            Network::Memory => "memory",
            Network::Libp2p => "libp2p",
        };
        table.insert("network".into(), toml::Value::String(name.into()));
    }
    if let Some(jobs) = options.jobs {
        table.insert("jobs".into(), toml::Value::Integer(jobs as i64));
    }
    let cells = experiment::expand_sweep(table)?;
    // Parse every cell first: a bad value in the last cell stops the sweep before it starts.
    let experiments = cells
        .iter()
        .map(|c| {
            let e = experiment::parse(c.table.clone(), path);
            if cells.len() > 1 {
                e.with_context(|| format!("sweep cell {}", c.name))
            } else {
                e
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let base = options.out.join(&experiments[0].name);
    let multi = MultiProgress::new();
    let mut outcomes = Vec::new();
    for (cell, e) in cells.iter().zip(&experiments) {
        let dir = if cell.name.is_empty() {
            base.clone()
        } else {
            base.join(&cell.name)
        };
        let summary_path = dir.join("summary.json");
        if summary_path.exists() {
            let text = std::fs::read_to_string(&summary_path)?;
            let summary: Summary = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a summary this fd-sim can read; delete it to rerun the cell",
                    summary_path.display()
                )
            })?;
            println!(
                "{:<40} finished earlier, skipped ({})",
                label(&e.name, &cell.name),
                dir.display()
            );
            outcomes.push(CellOutcome {
                cell: cell.name.clone(),
                dir,
                skipped: true,
                summary,
            });
            continue;
        }
        let shared = runner::prepare_data(e)?;
        let progress = if options.quiet {
            Progress::hidden()
        } else {
            Progress::new(&multi, &label(&e.name, &cell.name), e.rounds, e.nodes)
        };
        let result = runner::run(e, &shared, &progress)
            .await
            .with_context(|| format!("cell {}", label(&e.name, &cell.name)))?;
        let summary = output::write_run(&dir, e, &cell.name, &shared, &result)?;
        println!(
            "{:<40} {:>11}: final mean accuracy {:.4} (min {:.4}, max {:.4}), {:.3} MB sent per member, {:.1} s",
            label(&e.name, &cell.name),
            summary.algorithm,
            summary.final_mean_accuracy,
            summary.final_min_accuracy,
            summary.final_max_accuracy,
            summary.bytes_sent_per_node / 1e6,
            summary.wall_seconds
        );
        if let Some(audit) = &summary.audit {
            println!("{:<40} {}", "", audit.line());
        }
        outcomes.push(CellOutcome {
            cell: cell.name.clone(),
            dir,
            skipped: false,
            summary,
        });
    }
    if cells.len() > 1 {
        let rows: Vec<(String, Summary)> = outcomes
            .iter()
            .map(|o| (o.cell.clone(), o.summary.clone()))
            .collect();
        let table = output::sweep_table(&rows);
        fd_data::fsutil::write_atomic(&base.join("sweep.md"), table.as_bytes(), 0o644)?;
        let series: Vec<(String, Vec<(f64, f64)>)> = rows
            .iter()
            .map(|(cell, s)| {
                let points = s
                    .mean_accuracy_per_round
                    .iter()
                    .enumerate()
                    .map(|(i, a)| ((i + 1) as f64, *a))
                    .collect();
                (cell.clone(), points)
            })
            .collect();
        for ext in ["svg", "png"] {
            let chart = output::line_chart(
                &experiments[0].name,
                "round",
                "mean test accuracy",
                &series,
                ext,
            )?;
            fd_data::fsutil::write_atomic(
                &base.join(format!("sweep_accuracy.{ext}")),
                &chart,
                0o644,
            )?;
        }
        if output::has_seeds(&rows) {
            for (by_bytes, file, x_label) in [
                (false, "sweep_seed_mean_accuracy", "round"),
                (true, "sweep_seed_mean_accuracy_vs_bytes", "MB sent + received per member"),
            ] {
                let series = output::seed_mean_curves(&rows, by_bytes);
                for ext in ["svg", "png"] {
                    let chart = output::line_chart(
                        &format!("{} (mean over seeds)", experiments[0].name),
                        x_label,
                        "mean test accuracy",
                        &series,
                        ext,
                    )?;
                    fd_data::fsutil::write_atomic(
                        &base.join(format!("{file}.{ext}")),
                        &chart,
                        0o644,
                    )?;
                }
            }
        }
        println!("\n{table}");
        println!("written: {}", base.join("sweep.md").display());
    }
    Ok(outcomes)
}

fn label(name: &str, cell: &str) -> String {
    if cell.is_empty() {
        name.to_string()
    } else {
        format!("{name}/{cell}")
    }
}

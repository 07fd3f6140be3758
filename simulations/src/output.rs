//! What a run leaves in its folder, and the sweep's comparison table.
//!
//! * `metrics.csv`: one row per (round, member) of deterministic numbers
//!   (accuracies, losses, bytes, shares, the leakage audit's error,
//!   simulated clock). Two runs of the same experiment and seed give
//!   byte-identical files.
//! * `timings.csv`: the measured wall-clock seconds of each member's train,
//!   predict, aggregate and distil steps. They differ from run to run, which
//!   is why they are not in `metrics.csv`.
//! * `summary.json`: the experiment, final accuracies (honest members), bytes
//!   per member, wall time per round, peak memory, the leakage audit. Written last: a cell with
//!   a `summary.json` is finished, which is how a sweep resumes.
//! * `accuracy_vs_round` and `accuracy_vs_bytes` plots (SVG with text, PNG
//!   without; see [`fd_data::heatmap`] for why), and the partition's
//!   `labels` heatmap.
//!
//! Every file is written atomically (temporary file, fsync, rename), so an
//! interrupted run never leaves half a file behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use fd_data::heatmap::encode_png;
use fd_data::fsutil::write_atomic;
use fd_node::member::MemberData;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::audit::AuditSummary;
use crate::experiment::Experiment;
use crate::runner::{NodeRow, RunResult, peak_rss_bytes};

pub const METRICS_HEADER: &str = "round,node,model,active,byzantine,test_accuracy,local_accuracy,train_loss,distill_loss,bytes_sent,bytes_received,shares_aggregated,shares_rejected,shares_late,teacher_rows_kept,audit_tv,sim_seconds,dp_epsilon,validation_accuracy,rolled_back,teacher_accuracy";
pub const TIMINGS_HEADER: &str = "round,node,train_seconds,predict_seconds,encode_seconds,network_seconds,verify_seconds,aggregate_seconds,distill_seconds";

pub fn metrics_csv(rows: &[NodeRow]) -> String {
    let mut out = format!("{METRICS_HEADER}\n");
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{:.6},{:.6},{:.6},{:.6},{},{},{},{},{},{:.4},{},{:.3},{},{},{},{}",
            r.round,
            r.node,
            r.model,
            u8::from(r.active),
            u8::from(r.byzantine),
            r.test_accuracy,
            r.local_accuracy,
            r.train_loss,
            r.distill_loss,
            r.bytes_sent,
            r.bytes_received,
            r.shares_aggregated,
            r.shares_rejected,
            r.shares_late,
            r.teacher_rows_kept,
            r.audit_tv.map_or(String::new(), |tv| format!("{tv:.6}")),
            r.sim_seconds,
            r.dp_epsilon
                .map_or(String::new(), |eps| format!("{eps:.4}")),
            r.validation_accuracy
                .map_or(String::new(), |a| format!("{a:.6}")),
            u8::from(r.rolled_back),
            r.teacher_accuracy
                .map_or(String::new(), |a| format!("{a:.6}"))
        );
    }
    out
}

/// Per-model results of the last round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelResult {
    pub members: usize,
    pub final_mean_accuracy: f64,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub cell: String,
    pub algorithm: String,
    pub network: String,
    pub nodes: usize,
    pub rounds: u64,
    pub seed: u64,
    /// Mean test accuracy of honest members after each round.
    pub mean_accuracy_per_round: Vec<f64>,
    pub final_mean_accuracy: f64,
    pub final_min_accuracy: f64,
    pub final_max_accuracy: f64,
    /// Honest members' final accuracy by student architecture.
    pub per_model: BTreeMap<String, ModelResult>,
    /// Bytes a member sent over the whole run, mean over members.
    pub bytes_sent_per_node: f64,
    /// Bytes a member received over the whole run, mean over members.
    pub bytes_received_per_node: f64,
    pub byzantine_members: Vec<usize>,
    pub private_samples: Vec<usize>,
    pub wall_seconds: f64,
    pub wall_seconds_per_round: Vec<f64>,
    pub sim_seconds: f64,
    /// Peak resident memory of the process when the run ended (Linux VmHWM).
    pub peak_rss_bytes: Option<u64>,
    /// The leakage audit (`[audit]`), when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSummary>,
    /// ε (at `[dp] delta`) each honest member had spent by the last round,
    /// in member order; empty without DP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub final_dp_epsilon: Vec<f64>,
    /// Members (honest and Byzantine) that rolled back each round's
    /// distillation; only with a validation split (`[rollback]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollbacks_per_round: Option<Vec<u64>>,
    pub experiment: Experiment,
}

impl Summary {
    pub fn new(e: &Experiment, cell: &str, r: &RunResult) -> Self {
        let honest = |row: &&NodeRow| !row.byzantine;
        let per_round: Vec<f64> = (1..=e.rounds)
            .map(|round| {
                let acc: Vec<f64> = r
                    .rows
                    .iter()
                    .filter(honest)
                    .filter(|x| x.round == round)
                    .map(|x| x.test_accuracy)
                    .collect();
                acc.iter().sum::<f64>() / acc.len().max(1) as f64
            })
            .collect();
        let last: Vec<&NodeRow> = r
            .rows
            .iter()
            .filter(honest)
            .filter(|x| x.round == e.rounds)
            .collect();
        let finals: Vec<f64> = last.iter().map(|x| x.test_accuracy).collect();
        let mut per_model: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for row in &last {
            per_model
                .entry(row.model.clone())
                .or_default()
                .push(row.test_accuracy);
        }
        let members = r.rows.iter().map(|x| x.node).max().map_or(1, |m| m + 1);
        let sent: u64 = r.rows.iter().map(|x| x.bytes_sent).sum();
        let received: u64 = r.rows.iter().map(|x| x.bytes_received).sum();
        Summary {
            name: e.name.clone(),
            cell: cell.to_string(),
            algorithm: e.algorithm.name().to_string(),
            network: format!("{:?}", e.network).to_lowercase(),
            nodes: e.nodes,
            rounds: e.rounds,
            seed: e.seed,
            final_mean_accuracy: per_round.last().copied().unwrap_or(0.0),
            mean_accuracy_per_round: per_round,
            final_min_accuracy: finals.iter().copied().fold(f64::INFINITY, f64::min),
            final_max_accuracy: finals.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            per_model: per_model
                .into_iter()
                .map(|(k, v)| {
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    (
                        k,
                        ModelResult {
                            members: v.len(),
                            final_mean_accuracy: mean,
                        },
                    )
                })
                .collect(),
            bytes_sent_per_node: sent as f64 / members as f64,
            bytes_received_per_node: received as f64 / members as f64,
            byzantine_members: r.byzantine.clone(),
            private_samples: r.private_sizes.clone(),
            wall_seconds: r.wall_seconds,
            wall_seconds_per_round: r.round_wall_seconds.clone(),
            sim_seconds: r.rows.last().map_or(0.0, |x| x.sim_seconds),
            peak_rss_bytes: peak_rss_bytes(),
            audit: r.audit.clone(),
            final_dp_epsilon: last.iter().filter_map(|x| x.dp_epsilon).collect(),
            rollbacks_per_round: (e.rollback.validation_fraction > 0.0).then(|| {
                (1..=e.rounds)
                    .map(|round| {
                        r.rows
                            .iter()
                            .filter(|x| x.round == round && x.rolled_back)
                            .count() as u64
                    })
                    .collect()
            }),
            experiment: e.clone(),
        }
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    write_atomic(&path, bytes, 0o644).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes every file of a finished run into `dir`; `summary.json` last.
pub fn write_run(
    dir: &Path,
    e: &Experiment,
    cell: &str,
    shared: &MemberData,
    r: &RunResult,
) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write(dir, "metrics.csv", metrics_csv(&r.rows).as_bytes())?;
    let mut timings = format!("{TIMINGS_HEADER}\n");
    for t in &r.timings {
        let _ = writeln!(
            timings,
            "{},{},{:.4},{:.4},{:.5},{:.4},{:.5},{:.5},{:.4}",
            t.round,
            t.node,
            t.train,
            t.predict,
            t.encode,
            t.network,
            t.verify,
            t.aggregate,
            t.distill
        );
    }
    write(dir, "timings.csv", timings.as_bytes())?;
    let labels = shared.data.train.labels.as_slice();
    for ext in ["svg", "png"] {
        fd_data::partition::label_heatmap(
            labels,
            shared.data.train.classes,
            &shared.parts,
            &dir.join(format!("labels.{ext}")),
        )
        .with_context(|| "cannot draw the label heatmap")?;
    }
    let summary = Summary::new(e, cell, r);
    let by_round: Vec<(f64, f64)> = summary
        .mean_accuracy_per_round
        .iter()
        .enumerate()
        .map(|(i, a)| ((i + 1) as f64, *a))
        .collect();
    let members = e.nodes.max(1) as f64;
    let mut cumulative = 0u64;
    let by_bytes: Vec<(f64, f64)> = summary
        .mean_accuracy_per_round
        .iter()
        .enumerate()
        .map(|(i, a)| {
            cumulative += r
                .rows
                .iter()
                .filter(|x| x.round == i as u64 + 1)
                .map(|x| x.bytes_sent)
                .sum::<u64>();
            (cumulative as f64 / members / 1e6, *a)
        })
        .collect();
    let title = if cell.is_empty() {
        e.name.clone()
    } else {
        format!("{} {cell}", e.name)
    };
    for ext in ["svg", "png"] {
        let series = [(
            format!("{} mean accuracy", e.algorithm.name()),
            by_round.clone(),
        )];
        write(
            dir,
            &format!("accuracy_vs_round.{ext}"),
            &line_chart(&title, "round", "test accuracy", &series, ext)?,
        )?;
        let series = [(
            format!("{} mean accuracy", e.algorithm.name()),
            by_bytes.clone(),
        )];
        write(
            dir,
            &format!("accuracy_vs_bytes.{ext}"),
            &line_chart(
                &title,
                "MB sent per member (cumulative)",
                "test accuracy",
                &series,
                ext,
            )?,
        )?;
    }
    write(
        dir,
        "summary.json",
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A line chart of `series` as SVG (axes, labels, legend) or PNG (lines and
/// axes only: rasterising text would need a system font).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    ext: &str,
) -> anyhow::Result<Vec<u8>> {
    let size = (720u32, 440u32);
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = (y1 * 1.05).clamp(0.05, 1.0);
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        text: bool,
        (title, x_label, y_label): (&str, &str, &str),
        series: &[(String, Vec<(f64, f64)>)],
        (x0, x1, y1): (f64, f64, f64),
    ) -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(16);
        if text {
            builder
                .caption(title, ("sans-serif", 18))
                .x_label_area_size(40)
                .y_label_area_size(56);
        }
        let mut chart = builder.build_cartesian_2d(x0..x1, 0.0..y1).map_err(e)?;
        if text {
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .draw()
                .map_err(e)?;
        } else {
            chart
                .plotting_area()
                .draw(&Rectangle::new(
                    [(x0, 0.0), (x1, y1)],
                    BLACK.stroke_width(1),
                ))
                .map_err(e)?;
        }
        for (i, (name, points)) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(e)?;
            let drawn = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(e)?;
            if text {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)
    }
    let labels = (title, x_label, y_label);
    match ext {
        "svg" => {
            let mut svg = String::new();
            draw(
                SVGBackend::with_string(&mut svg, size).into_drawing_area(),
                true,
                labels,
                series,
                (x0, x1, y1),
            )
            .map_err(|e| anyhow::anyhow!("cannot draw {title}: {e}"))?;
            Ok(svg.into_bytes())
        }
        "png" => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            draw(
                BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area(),
                false,
                labels,
                series,
                (x0, x1, y1),
            )
            .map_err(|e| anyhow::anyhow!("cannot draw {title}: {e}"))?;
            Ok(encode_png(&rgb, size)?)
        }
        other => anyhow::bail!("unknown picture format {other}"),
    }
}

/// The sweep's comparison table (markdown), one row per cell.
pub fn sweep_table(summaries: &[(String, Summary)]) -> String {
    let mut out = String::from(
        "| cell | algorithm | final mean acc | min | max | MB sent/member | wall s/round |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (cell, s) in summaries {
        let per_round = s.wall_seconds_per_round.iter().sum::<f64>()
            / s.wall_seconds_per_round.len().max(1) as f64;
        let _ = writeln!(
            out,
            "| {} | {} | {:.4} | {:.4} | {:.4} | {:.3} | {:.1} |",
            if cell.is_empty() { "-" } else { cell },
            s.algorithm,
            s.final_mean_accuracy,
            s.final_min_accuracy,
            s.final_max_accuracy,
            s.bytes_sent_per_node / 1e6,
            per_round
        );
    }
    if has_seeds(summaries) {
        out.push('\n');
        out.push_str(&over_seeds_table(summaries));
    }
    out
}

/// Whether the sweep varies the seed.
pub fn has_seeds(summaries: &[(String, Summary)]) -> bool {
    summaries.iter().any(|(cell, _)| seed_of(cell).is_some())
}

/// The `seed=…` component of a sweep cell's name.
fn seed_of(cell: &str) -> Option<&str> {
    cell.split(',').find(|part| part.starts_with("seed="))
}

/// A cell's name without its seed component: the cells that differ only
/// by seed share it.
fn without_seed(cell: &str) -> String {
    cell.split(',')
        .filter(|part| !part.starts_with("seed="))
        .collect::<Vec<_>>()
        .join(",")
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The first round from which `curve` stays within `tolerance` of its
/// last value: where it flattens.
pub fn flat_from(curve: &[f64], tolerance: f64) -> usize {
    let Some(&last) = curve.last() else {
        return 0;
    };
    let mut from = curve.len();
    for (i, v) in curve.iter().enumerate().rev() {
        if (v - last).abs() > tolerance {
            break;
        }
        from = i + 1;
    }
    from
}

/// Cells that differ only by seed, grouped under their name without the
/// seed, in the order they first appear.
fn seed_groups(summaries: &[(String, Summary)]) -> Vec<(String, Vec<&Summary>)> {
    let mut groups: Vec<(String, Vec<&Summary>)> = Vec::new();
    for (cell, s) in summaries {
        let key = without_seed(cell);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(s),
            None => groups.push((key, vec![s])),
        }
    }
    groups
}

/// Per group of seeds, the seed-mean accuracy after each round against
/// the round (`by_bytes` false) or against the megabytes a member sent and
/// received by then (`by_bytes` true: a run's bytes spread evenly over its
/// rounds, exact when every member takes part in every round).
pub fn seed_mean_curves(
    summaries: &[(String, Summary)],
    by_bytes: bool,
) -> Vec<(String, Vec<(f64, f64)>)> {
    seed_groups(summaries)
        .into_iter()
        .map(|(cell, runs)| {
            let rounds = runs
                .iter()
                .map(|s| s.mean_accuracy_per_round.len())
                .min()
                .unwrap_or(0);
            let n = runs.len() as f64;
            let mb_per_round = runs
                .iter()
                .map(|s| {
                    (s.bytes_sent_per_node + s.bytes_received_per_node)
                        / 1e6
                        / s.mean_accuracy_per_round.len().max(1) as f64
                })
                .sum::<f64>()
                / n;
            let points = (0..rounds)
                .map(|r| {
                    let acc = runs.iter().map(|s| s.mean_accuracy_per_round[r]).sum::<f64>() / n;
                    let x = if by_bytes {
                        mb_per_round * (r + 1) as f64
                    } else {
                        (r + 1) as f64
                    };
                    (x, acc)
                })
                .collect();
            (if cell.is_empty() { "-".into() } else { cell }, points)
        })
        .collect()
}

/// Cells that differ only by seed, as mean ± std over their seeds: final
/// accuracy, bytes a member sent and received, and where the seed-mean
/// accuracy curve flattens (within 0.005 of its last value).
pub fn over_seeds_table(summaries: &[(String, Summary)]) -> String {
    let groups = seed_groups(summaries);
    let mut out = String::from(
        "| cell (over seeds) | algorithm | seeds | final mean acc | mean acc, last 5 rounds | MB sent + received/member | flat from round |\n|---|---|---:|---:|---:|---:|---:|\n",
    );
    for (cell, runs) in groups {
        let finals: Vec<f64> = runs.iter().map(|s| s.final_mean_accuracy).collect();
        let bytes: Vec<f64> = runs
            .iter()
            .map(|s| (s.bytes_sent_per_node + s.bytes_received_per_node) / 1e6)
            .collect();
        let rounds = runs.iter().map(|s| s.mean_accuracy_per_round.len()).min().unwrap_or(0);
        let curve: Vec<f64> = (0..rounds)
            .map(|r| runs.iter().map(|s| s.mean_accuracy_per_round[r]).sum::<f64>() / runs.len() as f64)
            .collect();
        // Under skew FedAvg's accuracy swings from round to round, so the
        // last round alone can flatter or hurt it: the mean of the last
        // five rounds is the steadier figure.
        let tails: Vec<f64> = runs
            .iter()
            .map(|s| {
                let acc = &s.mean_accuracy_per_round;
                let tail = &acc[acc.len().saturating_sub(5)..];
                tail.iter().sum::<f64>() / tail.len().max(1) as f64
            })
            .collect();
        let (acc, acc_std) = mean_std(&finals);
        let (tail, tail_std) = mean_std(&tails);
        let (mb, _) = mean_std(&bytes);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.4} ± {:.4} | {:.4} ± {:.4} | {:.2} | {} |",
            if cell.is_empty() { "-" } else { &cell },
            runs[0].algorithm,
            runs.len(),
            acc,
            acc_std,
            tail,
            tail_std,
            mb,
            flat_from(&curve, 0.005)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[0.80, 0.82, 0.84]);
        assert!((m - 0.82).abs() < 1e-12);
        assert!((s - 0.02).abs() < 1e-12, "sample std: {s}");
        assert_eq!(mean_std(&[0.5]), (0.5, 0.0));
    }

    #[test]
    fn a_curve_flattens_where_it_stays_near_its_last_value() {
        assert_eq!(flat_from(&[0.1, 0.5, 0.70, 0.801, 0.80], 0.005), 4);
        assert_eq!(flat_from(&[0.1, 0.5, 0.9], 0.005), 3);
        assert_eq!(flat_from(&[0.8, 0.8], 0.005), 1);
        // A dip after the plateau moves the point back.
        assert_eq!(flat_from(&[0.8, 0.8, 0.7, 0.8], 0.005), 4);
    }

    #[test]
    fn cells_that_differ_only_by_seed_share_a_row() {
        assert_eq!(without_seed("partition=iid,seed=2,variant=fd"), "partition=iid,variant=fd");
        assert_eq!(seed_of("partition=iid,seed=2"), Some("seed=2"));
        assert_eq!(seed_of("partition=iid"), None);
    }
}

//! Multi-dimensional evaluation of an exported model: how accurate, how
//! fast, how large, how memory- and energy-hungry.
//!
//! Why: accuracy alone does not say whether a model can ship; the
//! distillation toolchains users compare fd with end in an
//! accuracy/latency/size report, and the f32/f16/int8 trade-off can only be
//! judged on all of them at once. One function ([`evaluate_exported`])
//! serves `fd-node evaluate` and any caller such as the simulator.
//!
//! Measurement choices (documented in docs/operating.md):
//! - Latency is per call at batch 1: the forward pass plus reading the
//!   logits back (`into_data`, which also waits for a GPU), input tensors
//!   built before the clock starts; warm-up calls first, then at least
//!   1,000 timed calls; nearest-rank percentiles, so p50 ≤ p95 ≤ p99 holds
//!   by construction.
//! - Throughput is samples per second over whole batches of 64.
//! - Peak memory is the process's resident-set high-water mark (`VmHWM` in
//!   `/proc/self/status`): the whole process (code, data set, model), not
//!   the model alone. Before inference the mark is reset to the current
//!   resident set by writing `5` to `/proc/self/clear_refs` where the
//!   kernel allows it; the report says whether that worked, since without it
//!   the mark covers the process's whole life (loading the data included).
//! - Energy comes from Linux RAPL (`/sys/class/powercap/intel-rapl:*`,
//!   package domains) over the batch-1 runs; it counts the whole package
//!   (every process on the CPU). Where it cannot be read the report says
//!   "not available" and gives no figure.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use fd_data::{DataSource, Dataset};
use crate::device::DeviceKind;
use crate::export::{CARD_FILE, ExportError, ExportFormat, load_exported};
use crate::model::{Student, batch_of, predicted_classes};

/// How much to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvaluateOptions {
    /// Untimed batch-1 calls before the timed ones.
    pub warmup: usize,
    /// Timed batch-1 calls.
    pub latency_runs: usize,
    /// Batch size of the throughput measurement.
    pub throughput_batch: usize,
    /// Timed batches for throughput (after 2 untimed ones).
    pub throughput_batches: usize,
}

/// How long to time a model at batch 1: the arguments `fd-node evaluate` and
/// `fd-node compare` share (one definition, one set of defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct LatencyArgs {
    /// Timed batch-1 runs per model (at least 1000 for the documented percentiles).
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Untimed batch-1 runs first.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
}

impl LatencyArgs {
    /// The default measurement with these runs.
    pub fn options(self) -> EvaluateOptions {
        EvaluateOptions {
            latency_runs: self.runs,
            warmup: self.warmup,
            ..EvaluateOptions::default()
        }
    }
}

/// Writes a report (evaluation, comparison) to `path` as pretty JSON,
/// atomically.
pub fn write_json_report<T: Serialize>(path: &Path, report: &T) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(report).map_err(|e| format!("cannot encode the report: {e}"))?;
    fd_data::fsutil::write_atomic(path, &text, 0o644)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl Default for EvaluateOptions {
    fn default() -> Self {
        EvaluateOptions {
            warmup: 100,
            latency_runs: 1000,
            throughput_batch: 64,
            throughput_batches: 50,
        }
    }
}

/// Latency percentiles of one call, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub batch: usize,
    pub warmup: usize,
    pub runs: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub batch: usize,
    pub batches: usize,
    pub samples_per_second: f64,
    pub ms_per_batch: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    pub class: usize,
    pub samples: u64,
    pub correct: u64,
    /// `None` when the class has no sample.
    pub accuracy: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub samples: usize,
    pub overall: f64,
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileSizes {
    pub weights_bytes: u64,
    pub card_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// `VmHWM` after inference, bytes (`None` without `/proc/self/status`).
    pub peak_rss_bytes: Option<u64>,
    /// `VmRSS` just before inference, bytes.
    pub rss_before_bytes: Option<u64>,
    /// Whether the high-water mark was reset before inference.
    pub hwm_reset: bool,
    pub measures: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Energy {
    pub available: bool,
    /// Joules per 1,000 batch-1 inferences (package energy, whole CPU).
    pub joules_per_1000: Option<f64>,
    /// What was read, or why nothing was.
    pub note: String,
}

/// Everything `fd-node evaluate` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub model_dir: PathBuf,
    pub architecture: String,
    pub format: ExportFormat,
    pub params: usize,
    pub device: String,
    pub threads: usize,
    pub data: String,
    pub accuracy: Accuracy,
    pub latency: Latency,
    pub throughput: Throughput,
    pub file: FileSizes,
    pub memory: Memory,
    pub energy: Energy,
}

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("data: {0}")]
    Data(String),
    #[error("field `device`: {0}")]
    Device(String),
    #[error("options: {0}")]
    Options(String),
}

/// Reads a data source from a TOML file: a node config (its `[data]` table)
/// or a file holding only the table's keys (`kind = "fashion-mnist"` …).
/// Relative paths are taken from the file's folder.
pub fn data_source_from_file(path: &Path) -> Result<DataSource, EvaluateError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvaluateError::Data(format!("cannot read {}: {e}", path.display())))?;
    let value: toml::Table = toml::from_str(&text)
        .map_err(|e| EvaluateError::Data(format!("{}: not TOML: {e}", path.display())))?;
    let table = match value.get("data") {
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => {
            return Err(EvaluateError::Data(format!(
                "{}: `data` must be a table",
                path.display()
            )));
        }
        None => value,
    };
    let mut source: DataSource = toml::Value::Table(table)
        .try_into()
        .map_err(|e| EvaluateError::Data(format!("{}: field `data`: {e}", path.display())))?;
    source.rebase(path.parent().unwrap_or(Path::new(".")));
    Ok(source)
}

/// Evaluates the export in `dir` on `device`: on `data` (its test split is
/// what a caller passes), or when `None` on the test split of the data
/// source recorded in the model card.
pub fn evaluate_exported(
    dir: &Path,
    data: Option<&Dataset>,
    device: DeviceKind,
    options: EvaluateOptions,
) -> Result<EvaluationReport, EvaluateError> {
    evaluate_with_predictions(dir, data, device, options).map(|(report, _)| report)
}

/// [`evaluate_exported`], also returning the predicted class of every
/// evaluated sample (in the data's order), so a caller that needs them
/// (`fd-node compare`'s paired test) does not run the model twice.
pub fn evaluate_with_predictions(
    dir: &Path,
    data: Option<&Dataset>,
    device: DeviceKind,
    options: EvaluateOptions,
) -> Result<(EvaluationReport, Vec<usize>), EvaluateError> {
    if options.latency_runs == 0 || options.throughput_batch == 0 || options.throughput_batches == 0
    {
        return Err(EvaluateError::Options(
            "latency runs, throughput batch and batches must be at least 1".into(),
        ));
    }
    if !matches!(device, DeviceKind::Flex) {
        device.probe().map_err(EvaluateError::Device)?;
    }
    let model = load_exported(dir, &device.device())?;
    let card = &model.card;
    let loaded;
    let (test, data_name) = match data {
        Some(d) => (d, "given test set".to_string()),
        None => {
            let source = card.data.clone().ok_or_else(|| {
                EvaluateError::Data(format!(
                    "{} records no data source: pass --data",
                    dir.join(CARD_FILE).display()
                ))
            })?;
            let splits = source
                .load()
                .map_err(|e| EvaluateError::Data(format!("the card's data source: {e}")))?;
            let name = format!("{} (test split)", splits.source);
            loaded = splits.test;
            (&loaded, name)
        }
    };
    if test.shape != card.input.shape {
        return Err(EvaluateError::Data(format!(
            "samples are {:?} (channels, height, width), the model takes {:?}",
            test.shape, card.input.shape
        )));
    }
    if test.classes > card.classes || test.is_empty() {
        return Err(EvaluateError::Data(format!(
            "{} samples of {} classes; the model has {} classes and needs at least one sample",
            test.len(),
            test.classes,
            card.classes
        )));
    }
    let student = model.student.valid();
    let dev = device.device();
    let (rss_before, hwm_reset) = reset_peak_rss();
    let predictions = predicted_classes(&student, test, &dev);
    let accuracy = accuracy(&predictions, test, card.classes);
    let energy_start = rapl_read();
    let latency = latency(&student, test, &dev, options);
    let energy = energy(energy_start, rapl_read(), options.latency_runs);
    let throughput = throughput(&student, test, &dev, options);
    let peak = proc_status_kib("VmHWM").map(|k| k * 1024);
    let weights_bytes = file_len(&dir.join(&card.weights_file));
    let card_bytes = file_len(&dir.join(CARD_FILE));
    let report = EvaluationReport {
        model_dir: dir.to_path_buf(),
        architecture: card.architecture_name.clone(),
        format: card.format,
        params: card.params,
        device: device.name().into(),
        threads: rayon::current_num_threads(),
        data: data_name,
        accuracy,
        latency,
        throughput,
        file: FileSizes {
            weights_bytes,
            card_bytes,
            total_bytes: weights_bytes + card_bytes,
        },
        memory: Memory {
            peak_rss_bytes: peak,
            rss_before_bytes: rss_before,
            hwm_reset,
            measures: if hwm_reset {
                "VmHWM of the whole process during inference (reset to the resident set before it via /proc/self/clear_refs)".into()
            } else {
                "VmHWM of the whole process since it started (reset refused): loading included"
                    .into()
            },
        },
        energy,
    };
    Ok((report, predictions))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}


fn accuracy(predictions: &[usize], test: &Dataset, classes: usize) -> Accuracy {
    let mut confusion = vec![vec![0u64; classes]; classes];
    for (&predicted, &label) in predictions.iter().zip(&test.labels) {
        confusion[label as usize][predicted] += 1;
    }
    let per_class: Vec<ClassAccuracy> = confusion
        .iter()
        .enumerate()
        .map(|(class, row)| {
            let samples: u64 = row.iter().sum();
            let correct = row[class];
            ClassAccuracy {
                class,
                samples,
                correct,
                accuracy: (samples > 0).then(|| correct as f64 / samples as f64),
            }
        })
        .collect();
    let correct: u64 = per_class.iter().map(|c| c.correct).sum();
    Accuracy {
        samples: test.len(),
        overall: correct as f64 / test.len() as f64,
        per_class,
        confusion,
    }
}

/// Nearest-rank percentile of sorted values.
/// Nearest-rank percentile `q` ∈ [0, 1] of an ascending, non-empty slice.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency(student: &Student, test: &Dataset, device: &Device, o: EvaluateOptions) -> Latency {
    let inputs: Vec<Tensor<2>> = (0..o.warmup + o.latency_runs)
        .map(|i| batch_of(test, &[i % test.len()], device))
        .collect();
    let mut times = Vec::with_capacity(o.latency_runs);
    for (i, x) in inputs.into_iter().enumerate() {
        let start = Instant::now();
        let y = student.forward(x).into_data();
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(y);
        if i >= o.warmup {
            times.push(elapsed);
        }
    }
    times.sort_by(f64::total_cmp);
    Latency {
        batch: 1,
        warmup: o.warmup,
        runs: times.len(),
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
        p50_ms: percentile(&times, 0.50),
        p95_ms: percentile(&times, 0.95),
        p99_ms: percentile(&times, 0.99),
        max_ms: *times.last().expect("at least one run"),
    }
}

fn throughput(
    student: &Student,
    test: &Dataset,
    device: &Device,
    o: EvaluateOptions,
) -> Throughput {
    let b = o.throughput_batch;
    let make = |k: usize| {
        let indices: Vec<usize> = (0..b).map(|j| (k * b + j) % test.len()).collect();
        batch_of(test, &indices, device)
    };
    for k in 0..2 {
        let _ = student.forward(make(k)).into_data();
    }
    let inputs: Vec<Tensor<2>> = (0..o.throughput_batches).map(make).collect();
    let start = Instant::now();
    for x in inputs {
        std::hint::black_box(student.forward(x).into_data());
    }
    let seconds = start.elapsed().as_secs_f64();
    Throughput {
        batch: b,
        batches: o.throughput_batches,
        samples_per_second: (b * o.throughput_batches) as f64 / seconds,
        ms_per_batch: seconds * 1e3 / o.throughput_batches as f64,
    }
}

/// A `kB` field of `/proc/self/status`.
fn proc_status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `(VmRSS in bytes, whether VmHWM was reset to it)`.
fn reset_peak_rss() -> (Option<u64>, bool) {
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    (proc_status_kib("VmRSS").map(|k| k * 1024), reset)
}

/// Package-domain RAPL counters: `(energy_uj, max_energy_range_uj)` per domain.
type RaplReading = Result<Vec<(u64, u64)>, String>;

fn rapl_read() -> RaplReading {
    let root = Path::new("/sys/class/powercap");
    let entries = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut domains: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Top-level package domains only (intel-rapl:0, not intel-rapl:0:1).
            name.starts_with("intel-rapl:") && name.matches(':').count() == 1
        })
        .collect();
    domains.sort();
    if domains.is_empty() {
        return Err(format!("no RAPL package domain under {}", root.display()));
    }
    domains
        .iter()
        .map(|d| {
            let read = |f: &str| -> Result<u64, String> {
                let p = d.join(f);
                std::fs::read_to_string(&p)
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .trim()
                    .parse()
                    .map_err(|e| format!("{}: {e}", p.display()))
            };
            Ok((read("energy_uj")?, read("max_energy_range_uj")?))
        })
        .collect()
}

fn energy(start: RaplReading, end: RaplReading, runs: usize) -> Energy {
    match (start, end) {
        (Ok(a), Ok(b)) if a.len() == b.len() => {
            let micro: u64 = a
                .iter()
                .zip(&b)
                .map(|(&(s, range), &(e, _))| if e >= s { e - s } else { range - s + e })
                .sum();
            let joules = micro as f64 * 1e-6;
            Energy {
                available: true,
                joules_per_1000: Some(joules / runs as f64 * 1000.0),
                note: format!(
                    "RAPL package energy over the {runs} batch-1 runs ({} domain(s)), whole CPU",
                    a.len()
                ),
            }
        }
        (Err(e), _) | (_, Err(e)) => Energy {
            available: false,
            joules_per_1000: None,
            note: format!("not available: {e}"),
        },
        _ => Energy {
            available: false,
            joules_per_1000: None,
            note: "not available: RAPL domains changed during the measurement".into(),
        },
    }
}

impl std::fmt::Display for EvaluationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "model       {} ({}, {} params) from {}",
            self.architecture,
            self.format,
            self.params,
            self.model_dir.display()
        )?;
        writeln!(f, "device      {} ({} threads)", self.device, self.threads)?;
        writeln!(f, "data        {}", self.data)?;
        let a = &self.accuracy;
        writeln!(f, "accuracy    {:.4} on {} samples", a.overall, a.samples)?;
        for c in &a.per_class {
            match c.accuracy {
                Some(acc) => writeln!(
                    f,
                    "  class {:>3}  {acc:.4}  ({}/{})",
                    c.class, c.correct, c.samples
                )?,
                None => writeln!(f, "  class {:>3}  no samples", c.class)?,
            }
        }
        writeln!(f, "confusion   rows = true class, columns = predicted")?;
        for row in &a.confusion {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:>5}")).collect();
            writeln!(f, "  {}", cells.join(""))?;
        }
        let l = &self.latency;
        writeln!(
            f,
            "latency     batch 1, {} runs after {} warm-up: p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms  (mean {:.3}, max {:.3})",
            l.runs, l.warmup, l.p50_ms, l.p95_ms, l.p99_ms, l.mean_ms, l.max_ms
        )?;
        let t = &self.throughput;
        writeln!(
            f,
            "throughput  batch {}: {:.0} samples/s ({:.3} ms per batch, {} batches)",
            t.batch, t.samples_per_second, t.ms_per_batch, t.batches
        )?;
        writeln!(
            f,
            "file        weights {} bytes ({:.3} MiB), card {} bytes",
            self.file.weights_bytes,
            mib(self.file.weights_bytes),
            self.file.card_bytes
        )?;
        match self.memory.peak_rss_bytes {
            Some(p) => writeln!(
                f,
                "memory      peak RSS {:.1} MiB (before inference {:.1} MiB): {}",
                mib(p),
                mib(self.memory.rss_before_bytes.unwrap_or(0)),
                self.memory.measures
            )?,
            None => writeln!(f, "memory      not available (no /proc/self/status)")?,
        }
        match self.energy.joules_per_1000 {
            Some(j) => writeln!(
                f,
                "energy      {j:.3} J per 1000 inferences ({})",
                self.energy.note
            ),
            None => writeln!(f, "energy      {}", self.energy.note),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{Provenance, export_student};
    use crate::model::{InputShape, ModelConfig};

    fn exported(dir: &Path, data: &fd_data::DataSplits, record_source: bool) {
        let model = ModelConfig::Mlp { hidden: vec![32] };
        let input = InputShape::new(data.train.shape);
        let student = model.init(input, data.train.classes, 3, &Device::flex());
        export_student(
            &student,
            &model,
            input,
            data.train.classes,
            Provenance {
                data: record_source.then_some(DataSource::Synthetic {
                    seed: 5,
                    train: 10,
                    test: 300,
                }),
                ..Provenance::default()
            },
            ExportFormat::Int8,
            dir,
        )
        .unwrap();
    }

    /// The report as JSON has every field, latencies are positive and
    /// ordered, accuracy and confusion matrix agree, and the file size is
    /// the weights file's.
    #[test]
    fn the_report_is_json_with_every_field_and_ordered_latencies() {
        let data = DataSource::Synthetic {
            seed: 5,
            train: 10,
            test: 300,
        }
        .load()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        exported(dir.path(), &data, true);
        let options = EvaluateOptions::default();
        assert!(options.latency_runs >= 1000);
        // The card's recorded data source (no data passed).
        let report = evaluate_exported(dir.path(), None, DeviceKind::Flex, options).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        for path in [
            "/model_dir",
            "/architecture",
            "/format",
            "/params",
            "/device",
            "/threads",
            "/data",
            "/accuracy/samples",
            "/accuracy/overall",
            "/accuracy/per_class/9/accuracy",
            "/accuracy/confusion/9/9",
            "/latency/runs",
            "/latency/p50_ms",
            "/latency/p95_ms",
            "/latency/p99_ms",
            "/latency/mean_ms",
            "/throughput/batch",
            "/throughput/samples_per_second",
            "/file/weights_bytes",
            "/file/total_bytes",
            "/memory/peak_rss_bytes",
            "/memory/measures",
            "/energy/available",
            "/energy/joules_per_1000",
            "/energy/note",
        ] {
            assert!(json.pointer(path).is_some(), "no {path} in {json}");
        }
        // It reads back (floats aside, which JSON may round in the last bit).
        let back: EvaluationReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.accuracy.confusion, report.accuracy.confusion);
        assert_eq!(back.file, report.file);
        let l = &report.latency;
        assert_eq!(l.runs, 1000);
        assert!(
            l.p50_ms > 0.0 && l.p50_ms <= l.p95_ms && l.p95_ms <= l.p99_ms,
            "{l:?}"
        );
        assert!(l.p99_ms <= l.max_ms);
        assert!(report.throughput.samples_per_second > 0.0);
        assert_eq!(report.throughput.batch, 64);
        let a = &report.accuracy;
        assert_eq!(a.samples, 300);
        assert_eq!(a.confusion.iter().flatten().sum::<u64>(), 300);
        let diagonal: u64 = (0..10).map(|c| a.confusion[c][c]).sum();
        assert!((a.overall - diagonal as f64 / 300.0).abs() < 1e-12);
        assert_eq!(
            report.file.weights_bytes,
            std::fs::metadata(dir.path().join(crate::export::WEIGHTS_FILE))
                .unwrap()
                .len()
        );
        assert!(report.memory.peak_rss_bytes.unwrap() > 0);
        // Energy: a figure only where RAPL was read, never a made-up one.
        assert_eq!(
            report.energy.available,
            report.energy.joules_per_1000.is_some()
        );
        if !report.energy.available {
            assert!(report.energy.note.starts_with("not available"));
        }
        let text = report.to_string();
        assert!(text.contains("p99") && text.contains("confusion"), "{text}");
    }

    #[test]
    fn data_of_another_shape_or_none_is_an_error() {
        let data = DataSource::Synthetic {
            seed: 5,
            train: 10,
            test: 30,
        }
        .load()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        exported(dir.path(), &data, false);
        let err = evaluate_exported(
            dir.path(),
            None,
            DeviceKind::Flex,
            EvaluateOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--data"), "{err}");
        let mut other = data.test.clone();
        other.shape = [1, 1, 784];
        let err = evaluate_exported(
            dir.path(),
            Some(&other),
            DeviceKind::Flex,
            EvaluateOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("[1, 1, 784]"), "{err}");
    }

    #[test]
    fn data_source_files_name_the_bad_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.toml");
        std::fs::write(&path, "kind = \"npy\"\ntrain_x = \"x.npy\"\n").unwrap();
        let err = data_source_from_file(&path).unwrap_err();
        assert!(err.to_string().contains("data.toml"), "{err}");
        std::fs::write(
            &path,
            "name = \"n\"\n[data]\nkind = \"synthetic\"\nseed = 3\n",
        )
        .unwrap();
        assert!(matches!(
            data_source_from_file(&path).unwrap(),
            DataSource::Synthetic { seed: 3, .. }
        ));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.95), 950.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}

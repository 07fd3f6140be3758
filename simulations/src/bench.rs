//! `fd-sim bench`: where the time and the bytes go.
//!
//! Prints eight tables and writes them between the markers
//! `<!-- fd-sim bench: begin -->` / `<!-- fd-sim bench: end -->` of
//! `docs/performance.md` (the rest of that file is left as it is):
//!
//! 1. bytes per member per round, FD with each payload encoding vs FedAvg
//!    weights, per model of the zoo, at public subsets of 1,000 and 5,000;
//!    sizes are of real encoded share frames, not formulas;
//! 2. training and inference throughput per model, device and thread count;
//! 3. the round breakdown of 10 `fd-node` processes and a coordinator on
//!    127.0.0.1 (from the members' own per-round metrics);
//! 4. simulation scale: `fd-sim run` in a child process per size, so each
//!    peak-memory figure is that run's own;
//! 5. codec throughput: encode+sign and verify+decode next to a memcpy;
//! 6. the cost of DP-SGD: training samples/s with and without it (flex,
//!    one thread, the models with per-sample gradients);
//! 7. secure aggregation: bytes and milliseconds per member and round for
//!    10 and 100 members against plain shares, and the fixed-point error;
//! 8. whether rounds stay flat as students learn: a fixed 20-round
//!    federation (`fd-sim run` in a child process), seconds per round for
//!    train, predict, distil and the whole round, and the ratio of the last
//!    round to the first (target ≤ 1.15 at constant work; denormal floats
//!    made it 5×, issue 18).
//!
//! Every timing is the median of `--repeats` runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fd_data::DataSource;
use fd_node::device::DeviceKind;
use fd_node::learner::{Learner, OptimizerKind, TrainingConfig};
use fd_node::model::{InputShape, ModelConfig};
use fd_net::frame_len;
use fd_node::privacy::DpConfig;
use fd_protocol::{
    LogitShare, Message, PayloadEncoding, PublicSubset, RoundMetrics, ShareExpectation, SigningKey,
    digest::Digest,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::runner::fedavg_frame_bytes;

pub const BEGIN: &str = "<!-- fd-sim bench: begin -->";
pub const END: &str = "<!-- fd-sim bench: end -->";

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Sections to run (1–10, comma separated); all by default.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<u8>,
    /// Member counts of the simulation-scale table.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10usize, 100, 1000])]
    pub scale: Vec<usize>,
    /// Also measure the wgpu device in the throughput table (needs an adapter);
    /// same as adding `wgpu` to `--devices`.
    #[arg(long)]
    pub wgpu: bool,
    /// Devices of the throughput table (flex, ndarray, wgpu, wgpu-cpu).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["flex".to_string(), "ndarray".to_string()])]
    pub devices: Vec<String>,
    /// Training batch of the throughput table.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Optimizer of the throughput table's training steps: `adam`, or `sgd`
    /// (momentum 0.9, the setting of issue 7's PyTorch comparison).
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// Models of the throughput table by name (e.g. `fedavg-cnn`); all by default.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// File whose bench section is replaced with the tables.
    #[arg(long, default_value = "docs/performance.md")]
    pub write: PathBuf,
    /// Only print; do not touch `--write`.
    #[arg(long)]
    pub no_write: bool,
    /// Rounds of the round-flatness federation (section 8).
    #[arg(long, default_value_t = 20)]
    pub flat_rounds: u64,
    /// Scratch folder for the process benchmarks.
    #[arg(long, default_value = "results/bench")]
    pub scratch: PathBuf,
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        return f64::NAN;
    }
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

const MNIST: [usize; 3] = [1, 28, 28];
const CLASSES: usize = 10;

fn encodings() -> Vec<PayloadEncoding> {
    vec![
        PayloadEncoding::F32Le,
        PayloadEncoding::F16Le,
        PayloadEncoding::Int8,
        PayloadEncoding::TopK { k: 3 },
    ]
}

pub(crate) fn random_logits(rows: usize, classes: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows * classes)
        .map(|_| rng.random_range(-8.0f32..8.0))
        .collect()
}

pub(crate) fn share(
    key: &SigningKey,
    rows: usize,
    classes: usize,
    encoding: PayloadEncoding,
    logits: &[f32],
) -> anyhow::Result<LogitShare> {
    let subset = PublicSubset {
        public_set_digest: Digest([7; 32]),
        seed: 1,
        round: 1,
        size: rows as u32,
    };
    Ok(LogitShare::new_signed(
        key,
        "bench",
        subset,
        classes as u32,
        1000,
        encoding,
        logits,
    )?)
}

/// Table 1: bytes per member per round, 10 members in a full mesh.
pub fn bytes_table() -> anyhow::Result<String> {
    let members = 10u64;
    let key = SigningKey::from_seed([1; 32]);
    let input = InputShape::new(MNIST);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Bytes one member sends per round in a 10-member full mesh (FD: 9 share frames; FedAvg: one upload of its weights, and it downloads as many). Frames are real encoded `Message::Share`s plus the 4-byte length prefix; 10 classes.\n"
    );
    let _ = writeln!(
        out,
        "| model | params | FedAvg up | subset | f32 | f16 | int8 | top-3 | FedAvg ÷ f32 | FedAvg ÷ int8 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for model in ModelConfig::zoo() {
        let summary = model.describe(input, CLASSES);
        let fedavg = fedavg_frame_bytes(summary.params);
        for rows in [1000usize, 5000] {
            let logits = random_logits(rows, CLASSES, 1);
            let mut sizes = Vec::new();
            for encoding in encodings() {
                let s = share(&key, rows, CLASSES, encoding, &logits)?;
                sizes.push((members - 1) * frame_len(&Message::Share(s))?);
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {rows} | {} | {} | {} | {} | {:.1}× | {:.1}× |",
                summary.name,
                summary.params,
                fedavg,
                sizes[0],
                sizes[1],
                sizes[2],
                sizes[3],
                fedavg as f64 / sizes[0] as f64,
                fedavg as f64 / sizes[2] as f64,
            );
        }
    }
    Ok(out)
}

/// What the throughput table measures (section 2).
#[derive(Debug, Clone)]
pub struct ThroughputSpec {
    pub repeats: usize,
    pub devices: Vec<DeviceKind>,
    pub batch: usize,
    pub optimizer: OptimizerKind,
    pub models: Vec<ModelConfig>,
}

impl ThroughputSpec {
    fn from_options(o: &BenchOptions) -> anyhow::Result<Self> {
        let optimizer = match o.optimizer.as_str() {
            "adam" => OptimizerKind::Adam,
            "sgd" => OptimizerKind::Sgd,
            other => bail!("--optimizer: unknown optimizer `{other}` (adam, sgd)"),
        };
        let mut models = ModelConfig::zoo();
        if !o.models.is_empty() {
            for name in &o.models {
                anyhow::ensure!(
                    models.iter().any(|m| m.name() == *name),
                    "--models: unknown model `{name}` ({})",
                    models
                        .iter()
                        .map(|m| m.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            models.retain(|m| o.models.contains(&m.name()));
        }
        Ok(ThroughputSpec {
            repeats: o.repeats,
            devices: bench_devices(o)?,
            batch: o.batch,
            optimizer,
            models,
        })
    }
}

/// Samples/s of training steps of `batch` samples and of predicting 1,000
/// samples; with `dp`, each step is a DP-SGD step (the batch is the whole
/// private set, so Poisson sampling at q = 1 takes every sample once).
fn throughput(
    model: &ModelConfig,
    device: DeviceKind,
    threads: usize,
    spec: &ThroughputSpec,
    dp: Option<&DpConfig>,
) -> anyhow::Result<(f64, f64)> {
    let (repeats, batch) = (spec.repeats, spec.batch);
    let data = DataSource::Synthetic {
        seed: 1,
        train: 2048,
        test: 1000,
    }
    .load()?;
    let config = TrainingConfig {
        threads,
        batch_size: batch,
        local_epochs: 1,
        optimizer: spec.optimizer,
        // Plain supervised steps, like for like with docs/pytorch_parity.py.
        local_ntd: 0.0,
        ..TrainingConfig::default()
    };
    let mut learner = Learner::new(
        model,
        config,
        device,
        InputShape::new(data.train.shape),
        data.train.classes,
    );
    let batch_size = batch;
    let batch: Vec<usize> = (0..batch_size).collect();
    if let Some(dp) = dp {
        learner.enable_dp(dp.clone(), batch.len())?;
    }
    let public: Vec<usize> = (0..1000).collect();
    // Warm-up: first calls allocate and (on wgpu) compile kernels.
    learner.train_local(&data.train, &batch);
    let _ = learner.predict(&data.test, &public);
    let mut train = Vec::new();
    let mut predict = Vec::new();
    for _ in 0..repeats.max(1) {
        // Enough steps for at least half a second.
        let (mut steps, start) = (0usize, Instant::now());
        while steps < 2 || start.elapsed() < Duration::from_millis(500) {
            learner.train_local(&data.train, &batch);
            steps += 1;
        }
        train.push((steps * batch_size) as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let _ = learner.predict(&data.test, &public);
        predict.push(1000.0 / start.elapsed().as_secs_f64());
    }
    Ok((median(train), median(predict)))
}

/// Table 2: throughput per model, device and thread count.
pub fn throughput_table(spec: &ThroughputSpec) -> anyhow::Result<String> {
    let (repeats, devices, batch) = (spec.repeats, &spec.devices, spec.batch);
    anyhow::ensure!(
        (1..=2048).contains(&batch),
        "--batch must be between 1 and 2048, got {batch}"
    );
    for device in devices {
        device.probe().map_err(anyhow::Error::msg)?;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Training ({}, batch {batch}, synthetic 1×28×28) and prediction (1,000 samples) in samples/s; median of {repeats} runs of ≥ 0.5 s after a warm-up step.\n",
        match spec.optimizer {
            OptimizerKind::Adam => "Adam",
            OptimizerKind::Sgd => "SGD with momentum 0.9",
        }
    );
    let _ = writeln!(
        out,
        "| model | device | threads | train samples/s | predict samples/s |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for model in &spec.models {
        for &device in devices {
            let thread_counts: &[usize] =
                if matches!(device, DeviceKind::Wgpu | DeviceKind::WgpuCpu) {
                    &[1]
                } else {
                    &[1, 2]
                };
            for &threads in thread_counts {
                let (train, predict) = throughput(model, device, threads, spec, None)?;
                let line = format!(
                    "| {} | {} | {threads} | {train:.0} | {predict:.0} |",
                    model.name(),
                    device.name()
                );
                eprintln!("{line}");
                let _ = writeln!(out, "{line}");
            }
        }
    }
    Ok(out)
}

/// Table 6: DP-SGD training steps against ordinary ones, flex, one thread.
pub fn dp_table(spec: &ThroughputSpec) -> anyhow::Result<String> {
    let (repeats, batch) = (spec.repeats, spec.batch);
    let dp = DpConfig {
        enabled: true,
        ..DpConfig::default()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Training steps of {batch} samples ({}, synthetic 1×28×28, flex, 1 thread) in samples/s, without and with DP-SGD (C = 1, σ = 1: probe pass for per-sample norms, clipped pass, Gaussian noise); median of {repeats} runs of ≥ 0.5 s after a warm-up step.\n",
        match spec.optimizer {
            OptimizerKind::Adam => "Adam",
            OptimizerKind::Sgd => "SGD with momentum 0.9",
        }
    );
    let _ = writeln!(
        out,
        "| model | train samples/s | DP-SGD train samples/s | DP-SGD time / plain time |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for model in &spec.models {
        if matches!(model, ModelConfig::ResNet { .. }) {
            continue; // batch norm: no per-sample gradients
        }
        let (plain, _) = throughput(model, DeviceKind::Flex, 1, spec, None)?;
        let (private, _) = throughput(model, DeviceKind::Flex, 1, spec, Some(&dp))?;
        let line = format!(
            "| {} | {plain:.0} | {private:.0} | {:.2}× |",
            model.name(),
            plain / private
        );
        eprintln!("{line}");
        let _ = writeln!(out, "{line}");
    }
    Ok(out)
}

/// The folder of the running executable, where cargo also put fd-node and fd-coordinator.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable has no folder")?.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace first (cargo build --workspace)",
            path.display()
        );
    }
    Ok(path)
}

fn wait_for_file(path: &Path, timeout: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.trim().is_empty()
        {
            return Ok(text.trim().to_string());
        }
        if start.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The transport a 10-process federation runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    fn listen(self) -> &'static str {
        match self {
            Transport::Tcp => "/ip4/127.0.0.1/tcp/0",
            Transport::Quic => "/ip4/127.0.0.1/udp/0/quic-v1",
        }
    }
}

/// 10 fd-node processes and a coordinator on 127.0.0.1, all listening on
/// `transport` only, for `rounds` rounds: every member's round metrics and
/// the run's wall-clock seconds.
fn ten_processes(
    scratch: &Path,
    rounds: u64,
    transport: Transport,
) -> anyhow::Result<(Vec<RoundMetrics>, f64)> {
    let members = 10usize;
    let listen = transport.listen();
    let dir = scratch.join(format!("round-breakdown-{transport:?}").to_lowercase());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let federation = format!(
        "[federation]\nid = \"bench\"\nrounds = {rounds}\npublic_size = 5000\nsubset_size = 2000\nseed = 42\n\n[data]\nkind = \"auto\"\n"
    );
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            "listen = \"{listen}\"\nkey_file = \"coordinator.key\"\nmin_members = {members}\nround_timeout_secs = 600\naddress_file = \"coordinator.addr\"\n\n{federation}"
        ),
    )?;
    let spawn = |bin: &str, args: &[&str], log: &str| -> anyhow::Result<std::process::Child> {
        Ok(Command::new(sibling(bin)?)
            .args(args)
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(log))?)
            .spawn()?)
    };
    let mut children = vec![spawn(
        "fd-coordinator",
        &["--config", "coordinator.toml"],
        "coordinator.log",
    )?];
    let address = wait_for_file(&dir.join("coordinator.addr"), Duration::from_secs(120))?;
    for i in 0..members {
        std::fs::write(
            dir.join(format!("node-{i}.toml")),
            format!(
                "name = \"node-{i}\"\nlisten = \"{listen}\"\nkey_file = \"node-{i}.key\"\ncoordinator = \"{address}\"\nmetrics_file = \"node-{i}.jsonl\"\n\n{federation}\n[partition]\nnodes = {members}\nindex = {i}\nscheme = {{ kind = \"dirichlet\", alpha = 0.5 }}\n\n[training]\nseed = {i}\n"
            ),
        )?;
        children.push(spawn(
            "fd-node",
            &["run", "--config", &format!("node-{i}.toml")],
            &format!("node-{i}.log"),
        )?);
    }
    let start = Instant::now();
    for child in children.iter_mut().skip(1) {
        let status = child.wait()?;
        if !status.success() {
            bail!("an fd-node exited with {status}; logs in {}", dir.display());
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let _ = children[0].wait();
    let mut metrics: Vec<RoundMetrics> = Vec::new();
    for i in 0..members {
        let text = std::fs::read_to_string(dir.join(format!("node-{i}.jsonl")))?;
        for line in text.lines() {
            metrics.push(serde_json::from_str(line)?);
        }
    }
    Ok((metrics, wall))
}

/// Table 3: 10 fd-node processes and a coordinator on 127.0.0.1.
pub fn round_breakdown(scratch: &Path, rounds: u64) -> anyhow::Result<String> {
    let (metrics, wall) = ten_processes(scratch, rounds, Transport::Tcp)?;
    type Step = (&'static str, fn(&RoundMetrics) -> f64);
    let steps: [Step; 8] = [
        ("train (local epoch)", |m| m.train_seconds),
        ("predict (public subset)", |m| m.predict_seconds),
        ("encode + sign", |m| m.encode_seconds),
        ("network: push, then wait for peers", |m| m.network_seconds),
        ("verify + decode (peers' shares)", |m| m.verify_seconds),
        ("aggregate", |m| m.aggregate_seconds),
        ("distil", |m| m.distill_seconds),
        ("checkpoint (save, fsync, rename)", |m| m.checkpoint_seconds),
    ];
    let totals: Vec<f64> = metrics
        .iter()
        .map(|m| steps.iter().map(|(_, f)| f(m)).sum())
        .collect();
    let round = median(totals.clone());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "10 `fd-node` processes and an `fd-coordinator` on 127.0.0.1 (TCP + Noise + Yamux), Fashion-MNIST (synthetic if absent), Dirichlet α = 0.5, MLP 784-200-200-10, 2,000 public samples per round (f32), {rounds} rounds; each member's per-round metrics, median over members × rounds. {:.0} s wall for the run.\n",
        wall
    );
    let _ = writeln!(out, "| step | median seconds | share of the round |");
    let _ = writeln!(out, "|---|---:|---:|");
    for (name, f) in &steps {
        let x = median(metrics.iter().map(f).collect());
        let _ = writeln!(out, "| {name} | {x:.4} | {:.2} % |", 100.0 * x / round);
    }
    let codec_aggregate: Vec<f64> = metrics
        .iter()
        .zip(&totals)
        .map(|(m, t)| (m.encode_seconds + m.verify_seconds + m.aggregate_seconds) / t)
        .collect();
    let outside: Vec<f64> = metrics
        .iter()
        .zip(&totals)
        .map(|(m, t)| {
            (m.encode_seconds + m.verify_seconds + m.aggregate_seconds + m.network_seconds) / t
        })
        .collect();
    let _ = writeln!(out, "| **round (sum of steps)** | {round:.4} | 100 % |\n");
    let _ = writeln!(
        out,
        "Outside learning: codec + aggregation {:.2} % of a round (median); with the network wait {:.2} %. The network wait includes waiting for the slowest peer to finish training: 10 members share 2 cores here.",
        100.0 * median(codec_aggregate),
        100.0 * median(outside)
    );
    Ok(out)
}

/// Table 10: the 10-process federation of table 3 over TCP and over QUIC.
pub fn transport_rounds_table(scratch: &Path, rounds: u64) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "The federation of section 3 ({rounds} rounds), every process listening on one transport only; medians over members × rounds.\n"
    );
    let _ = writeln!(
        out,
        "| transport | wall s | round s (sum of steps) | network s (push, then wait) | shares sent per round |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for transport in [Transport::Tcp, Transport::Quic] {
        let (metrics, wall) = ten_processes(scratch, rounds, transport)?;
        let round = median(
            metrics
                .iter()
                .map(|m| {
                    m.train_seconds
                        + m.predict_seconds
                        + m.encode_seconds
                        + m.network_seconds
                        + m.verify_seconds
                        + m.aggregate_seconds
                        + m.distill_seconds
                        + m.checkpoint_seconds
                })
                .collect(),
        );
        let network = median(metrics.iter().map(|m| m.network_seconds).collect());
        let sent = median(metrics.iter().map(|m| m.shares_sent as f64).collect());
        let _ = writeln!(
            out,
            "| {} | {wall:.1} | {round:.3} | {network:.3} | {sent:.0} |",
            match transport {
                Transport::Tcp => "TCP + Noise + Yamux",
                Transport::Quic => "QUIC",
            }
        );
    }
    Ok(out)
}

/// Writes `experiment` to `<dir>/<name>.toml` and runs it with `fd-sim run`
/// in a child process (so its peak memory is its own), into `<dir>/<name>/`
/// (removed first).
fn fd_sim_run_child(
    dir: &Path,
    name: &str,
    experiment: &str,
) -> anyhow::Result<std::process::ExitStatus> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_dir_all(dir.join(name));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, experiment)?;
    Ok(Command::new(std::env::current_exe()?)
        .args(["run", path.to_str().context("path is not UTF-8")?, "--quiet", "--out"])
        .arg(dir)
        .stdout(Stdio::null())
        .status()?)
}

/// Table 4: `fd-sim run` at each size, in a child process.
pub fn scale_table(scratch: &Path, sizes: &[usize]) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "`fd-sim run` in its own process per size: Fashion-MNIST (synthetic if absent), MLP 784-200-200-10 students, Dirichlet α = 0.5, 2 rounds, 500 public samples per round, 2 distillation epochs, evaluation on 1,000 test samples; full mesh up to 100 members, 10 random in-neighbours beyond (a full mesh of 1,000 would hold 999 shares per member per round). `jobs` = 2.\n"
    );
    let _ = writeln!(
        out,
        "| members | topology | wall s / round (median) | peak RSS | RSS per member | bytes sent / member / round |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|");
    for &n in sizes {
        let topology = if n <= 100 {
            "kind = \"full\"".to_string()
        } else {
            "kind = \"random\"\nk = 10".to_string()
        };
        let name = format!("scale-{n}");
        let dir = scratch.join("scale");
        let status = fd_sim_run_child(
            &dir,
            &name,
            &format!(
                "name = \"{name}\"\nseed = 42\nnodes = {n}\nrounds = 2\njobs = 2\n[data]\nkind = \"auto\"\n[public]\nsize = 5000\nsubset_size = 500\n[partition]\nkind = \"dirichlet\"\nalpha = 0.5\n[model]\nkind = \"mlp\"\nhidden = [200, 200]\n[training]\nlocal_epochs = 1\ndistill_epochs = 2\neval_samples = 1000\n[topology]\n{topology}\n"
            ),
        )?;
        if !status.success() {
            let _ = writeln!(out, "| {n} | | failed ({status}) | | | |");
            continue;
        }
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            dir.join(&name).join("summary.json"),
        )?)?;
        let per_round: Vec<f64> = summary["wall_seconds_per_round"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        let rss = summary["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
        let sent = summary["bytes_sent_per_node"].as_f64().unwrap_or(f64::NAN) / 2.0;
        let line = format!(
            "| {n} | {} | {:.1} | {:.2} GiB | {:.1} MiB | {sent:.0} |",
            if n <= 100 { "full" } else { "random k = 10" },
            median(per_round),
            rss / (1u64 << 30) as f64,
            rss / n as f64 / (1u64 << 20) as f64
        );
        eprintln!("{line}");
        let _ = writeln!(out, "{line}");
    }
    Ok(out)
}

/// Per-round sums over the members of a `timings.csv` (train, predict and
/// distillation seconds), in round order.
pub fn per_round_step_seconds(timings_csv: &str) -> anyhow::Result<Vec<(u64, [f64; 3])>> {
    let mut reader = csv::Reader::from_reader(timings_csv.as_bytes());
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("timings.csv has no `{name}` column"))
    };
    let round = column("round")?;
    let steps = [
        column("train_seconds")?,
        column("predict_seconds")?,
        column("distill_seconds")?,
    ];
    let mut sums: std::collections::BTreeMap<u64, [f64; 3]> = Default::default();
    for (line, record) in reader.records().enumerate() {
        let record = record?;
        let number = |i: usize| -> anyhow::Result<f64> {
            record[i]
                .parse()
                .with_context(|| format!("timings.csv row {}: `{}` is not a number", line + 1, &record[i]))
        };
        let r = number(round)? as u64;
        let sum = sums.entry(r).or_default();
        for (k, &i) in steps.iter().enumerate() {
            sum[k] += number(i)?;
        }
    }
    Ok(sums.into_iter().collect())
}

/// Last over first, of a series of per-round seconds.
pub fn last_over_first(series: &[f64]) -> f64 {
    match (series.first(), series.last()) {
        (Some(first), Some(last)) if *first > 0.0 => last / first,
        _ => f64::NAN,
    }
}

/// Table 8: a fixed federation run for `rounds` rounds at constant work per
/// round; if rounds slow down as the students grow confident, it shows.
pub fn flatness_table(scratch: &Path, rounds: u64) -> anyhow::Result<String> {
    let name = "round-flatness";
    let dir = scratch.join("flatness");
    let status = fd_sim_run_child(
        &dir,
        name,
        &format!(
            "name = \"{name}\"\nseed = 1\nnodes = 10\nrounds = {rounds}\njobs = 2\n[data]\nkind = \"auto\"\n[public]\nsize = 10000\nsubset_size = 5000\n[partition]\nkind = \"dirichlet\"\nalpha = 0.1\n[model]\nkind = \"mlp\"\nhidden = [200, 200]\n"
        ),
    )?;
    if !status.success() {
        bail!("fd-sim run of {} failed ({status})", dir.join(name).display());
    }
    let run = dir.join(name);
    let steps = per_round_step_seconds(&std::fs::read_to_string(run.join("timings.csv"))?)?;
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json"))?)?;
    let wall: Vec<f64> = summary["wall_seconds_per_round"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "`fd-sim run` of one fixed federation ({}): 10 members, Dirichlet α = 0.1, MLP 784-200-200-10, the simulator's default recipe (`fd-sim example`: SGD lr 0.01 momentum 0.9, batch 32, 1 local + 2 distillation epochs, 5,000 public samples per round, ERA at T 0.1 with density row weights), seed 1, {rounds} rounds, `jobs` = 2. The work is the same every round; seconds are summed over the 10 members (train, predict, distil) or the round's wall clock.\n",
        match DataSource::Auto.resolve() {
            DataSource::FashionMnist { .. } => "Fashion-MNIST",
            _ => "synthetic data: Fashion-MNIST is not installed",
        }
    );
    let _ = writeln!(out, "| round | train s | predict s | distil s | round wall s |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|");
    for (i, (round, [train, predict, distill])) in steps.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {round} | {train:.2} | {predict:.2} | {distill:.2} | {} |",
            wall.get(i).map_or("".into(), |w| format!("{w:.2}"))
        );
    }
    let column = |k: usize| steps.iter().map(|(_, s)| s[k]).collect::<Vec<f64>>();
    let _ = writeln!(
        out,
        "\nLast round ÷ first (target ≤ 1.15): train {:.2}, predict {:.2}, distil {:.2}, round wall {:.2}.",
        last_over_first(&column(0)),
        last_over_first(&column(1)),
        last_over_first(&column(2)),
        last_over_first(&wall)
    );
    Ok(out)
}

/// Table 5: codec throughput.
pub fn codec_table(repeats: usize) -> anyhow::Result<String> {
    let key = SigningKey::from_seed([2; 32]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "One share of 2,000 × 10 and one of 5,000 × 100 logits; MB/s of f32 logits (rows × classes × 4 bytes) processed, median of {repeats} runs of ≥ 0.3 s. `memcpy` copies the same number of bytes.\n"
    );
    let _ = writeln!(
        out,
        "| shape | encoding | encode + sign MB/s | verify + decode MB/s | memcpy MB/s |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for (rows, classes) in [(2000usize, 10usize), (5000, 100)] {
        let logits = random_logits(rows, classes, 3);
        let mb = (rows * classes * 4) as f64 / 1e6;
        let rate = |f: &mut dyn FnMut()| -> f64 {
            let mut rates = Vec::new();
            for _ in 0..repeats.max(1) {
                let (mut n, start) = (0usize, Instant::now());
                while n < 2 || start.elapsed() < Duration::from_millis(300) {
                    f();
                    n += 1;
                }
                rates.push(n as f64 * mb / start.elapsed().as_secs_f64());
            }
            median(rates)
        };
        let copy = {
            let source = logits.clone();
            let mut target = vec![0f32; source.len()];
            rate(&mut || {
                target.copy_from_slice(std::hint::black_box(&source));
                std::hint::black_box(&target);
            })
        };
        for encoding in encodings() {
            let s = share(&key, rows, classes, encoding, &logits)?;
            let expect = ShareExpectation {
                federation_id: "bench".into(),
                round: 1,
                subset: s.subset,
                classes: classes as u32,
            };
            let encode = rate(&mut || {
                let s = share(&key, rows, classes, encoding, std::hint::black_box(&logits))
                    .expect("encodes");
                std::hint::black_box(fd_protocol::encode(&Message::Share(s)).expect("frames"));
            });
            let frame = fd_protocol::encode(&Message::Share(s))?;
            let decode = rate(&mut || {
                let Message::Share(s) =
                    fd_protocol::decode(std::hint::black_box(&frame)).expect("decodes")
                else {
                    panic!("not a share")
                };
                std::hint::black_box(s.validate(&expect).expect("valid"));
            });
            let _ = writeln!(
                out,
                "| {rows} × {classes} | {} | {encode:.0} | {decode:.0} | {copy:.0} |",
                encoding.name()
            );
        }
    }
    Ok(out)
}

/// Secure aggregation's cost per member and round, for 10 and 100
/// members: bytes on the wire against plain f32 shares, the milliseconds of
/// each step, and the teacher's precision loss from the fixed-point
/// encoding. Every member runs its own participant of the protocol; the
/// times are each member's own steps (the median member), not the round's.
pub fn secure_table(repeats: usize) -> anyhow::Result<String> {
    use fd_node::aggregate::{Aggregator, Contribution, probabilities};
    use fd_node::aggregate::TeacherFilter;
    use fd_protocol::secagg::{KnowledgeSums, Participant, RoundContext, encode_knowledge, wire_len};
    use rand_chacha::ChaCha20Rng;

    let classes = 10usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Each member's own steps in a round where all deliver, median member of the median of {repeats} runs; threshold = smallest majority. Plain: one signed f32 share frame to each of the n − 1 others (what it sends; it receives as much). Secure: advertisement, sealed key shares, masked input (rows × (classes + 1) u32) and reveal, to each other member. Precision: max |Δp| between the teacher from the unmasked sums and the plain teacher of the same contributions (mean of probabilities, random logits with density-like row weights).\n"
    );
    let _ = writeln!(
        out,
        "| members | rows | plain sent | secure sent | × | advertise + key shares ms | mask ms | unmask ms | max \\|Δp\\| |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [10usize, 100] {
        for rows in [1000usize, 5000] {
            let keys: Vec<SigningKey> = (0..n)
                .map(|i| {
                    let mut seed = [0u8; 32];
                    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                    SigningKey::from_seed(seed)
                })
                .collect();
            let public: Vec<_> = keys.iter().map(SigningKey::public_key).collect();
            let logits: Vec<Vec<f32>> = (0..n)
                .map(|i| random_logits(rows, classes, 100 + i as u64))
                .collect();
            let weights: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let mut rng = ChaCha8Rng::seed_from_u64(500 + i as u64);
                    (0..rows).map(|_| f32::from(rng.random_range(0u8..=255)) / 255.0).collect()
                })
                .collect();
            let encoded: Vec<Vec<u32>> = logits
                .iter()
                .zip(&weights)
                .map(|(l, w)| encode_knowledge(&probabilities(l, classes), Some(w), classes))
                .collect::<Result<_, _>>()?;
            let ctx = RoundContext::new("bench", 1, &public, RoundContext::minimum_threshold(n))?;
            let mut runs = Vec::new();
            let mut sent_secure = 0usize;
            let mut worst = 0f64;
            for repeat in 0..repeats.max(1) {
                let mut rng = ChaCha20Rng::seed_from_u64(repeat as u64);
                let mut setup = vec![0f64; n];
                let mut mask = vec![0f64; n];
                let mut unmask = vec![0f64; n];
                let mut sent = vec![0usize; n];
                let mut parts = Vec::with_capacity(n);
                let mut adverts = Vec::with_capacity(n);
                for (i, key) in keys.iter().enumerate() {
                    let start = Instant::now();
                    let (p, a) = Participant::new(ctx.clone(), key, &mut rng)?;
                    setup[i] += start.elapsed().as_secs_f64();
                    sent[i] += wire_len(&a) * (n - 1);
                    parts.push(p);
                    adverts.push(a);
                }
                for (i, p) in parts.iter_mut().enumerate() {
                    let start = Instant::now();
                    for a in &adverts {
                        p.accept_advertisement(a.clone())?;
                    }
                    setup[i] += start.elapsed().as_secs_f64();
                }
                let mut sealed = Vec::new();
                for (i, p) in parts.iter_mut().enumerate() {
                    let start = Instant::now();
                    let messages = p.key_shares(&mut rng)?;
                    setup[i] += start.elapsed().as_secs_f64();
                    sent[i] += messages.iter().map(wire_len).sum::<usize>();
                    sealed.extend(messages);
                }
                for m in &sealed {
                    let to = public.iter().position(|k| *k == m.to).expect("a member");
                    let start = Instant::now();
                    parts[to].accept_key_shares(m)?;
                    setup[to] += start.elapsed().as_secs_f64();
                }
                let mut inputs = Vec::with_capacity(n);
                for (i, p) in parts.iter_mut().enumerate() {
                    let start = Instant::now();
                    let input = p.masked_input(&encoded[i])?;
                    mask[i] += start.elapsed().as_secs_f64();
                    sent[i] += wire_len(&input) * (n - 1);
                    inputs.push(input);
                }
                let mut reveals = Vec::with_capacity(n);
                for (i, p) in parts.iter_mut().enumerate() {
                    let start = Instant::now();
                    for input in &inputs {
                        p.accept_masked_input(input)?;
                    }
                    let reveal = p.reveal(&public)?;
                    unmask[i] += start.elapsed().as_secs_f64();
                    sent[i] += wire_len(&reveal) * (n - 1);
                    reveals.push(reveal);
                }
                // Every member unmasks in a real round; time a few, they are alike.
                let timed = n.min(5);
                let mut sum = Vec::new();
                for (i, p) in parts.iter().enumerate().take(timed) {
                    let start = Instant::now();
                    sum = p.unmask(&public, &inputs, &reveals)?.sum;
                    unmask[i] += start.elapsed().as_secs_f64();
                }
                let sums = KnowledgeSums::decode(&sum, classes)?;
                let contributions: Vec<Contribution> = logits
                    .iter()
                    .zip(&weights)
                    .map(|(l, w)| Contribution {
                        logits: l,
                        samples: 1,
                        row_weights: Some(w),
                    })
                    .collect();
                let plain = Aggregator::MeanProbabilities.aggregate(&contributions, rows, classes)?;
                let secure = Aggregator::MeanProbabilities.aggregate_sums(&sums, n, TeacherFilter::default())?;
                for (a, b) in plain.logits.iter().zip(&secure.logits) {
                    worst = worst.max((f64::from(a.exp()) - f64::from(b.exp())).abs());
                }
                sent_secure = median(sent.iter().map(|&b| b as f64).collect()) as usize;
                runs.push((
                    median(setup),
                    median(mask),
                    median(unmask[..timed].to_vec()),
                ));
            }
            let pick = |f: fn(&(f64, f64, f64)) -> f64| median(runs.iter().map(f).collect()) * 1e3;
            let plain_frame = frame_len(&Message::Share(share(
                &keys[0],
                rows,
                classes,
                PayloadEncoding::F32Le,
                &logits[0],
            )?))?;
            let plain_sent = plain_frame as usize * (n - 1);
            let _ = writeln!(
                out,
                "| {n} | {rows} | {:.2} MB | {:.2} MB | {:.2} | {:.1} | {:.1} | {:.1} | {worst:.1e} |",
                plain_sent as f64 / 1e6,
                sent_secure as f64 / 1e6,
                sent_secure as f64 / plain_sent as f64,
                pick(|r| r.0),
                pick(|r| r.1),
                pick(|r| r.2),
            );
        }
    }
    Ok(out)
}

/// Replaces the bench section of `path` (or appends one).
pub fn write_section(path: &Path, body: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{BEGIN}\n{body}{END}");
    let text = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{section}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    fd_data::fsutil::write_atomic(path, text.as_bytes(), 0o644)?;
    Ok(())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or("unknown".to_string(), |kb| {
            format!("{:.1} GiB", kb / (1u64 << 20) as f64)
        });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores ({cpu}), {memory} memory")
}

/// The throughput table's devices: `--devices`, plus wgpu with `--wgpu`.
fn bench_devices(o: &BenchOptions) -> anyhow::Result<Vec<DeviceKind>> {
    let mut names = o.devices.clone();
    if o.wgpu && !names.iter().any(|n| n == "wgpu") {
        names.push("wgpu".into());
    }
    names
        .iter()
        .map(|name| {
            DeviceKind::ALL
                .into_iter()
                .find(|d| d.name() == name)
                .with_context(|| {
                    format!("--devices: unknown device `{name}` (flex, ndarray, wgpu, wgpu-cpu)")
                })
        })
        .collect()
}

pub fn run(o: &BenchOptions) -> anyhow::Result<()> {
    let spec = ThroughputSpec::from_options(o)?;
    let want = |n: u8| o.only.is_empty() || o.only.contains(&n);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "## `fd-sim bench`\n\nGenerated by `cargo run --bin fd-sim -- bench` (dev profile: dependencies at opt-level 3 without debug assertions, fd-learn and fd-node at opt-level 3) on {}. Sections run this time: {}.\n",
        machine(),
        if o.only.is_empty() {
            "all".to_string()
        } else {
            format!("{:?}", o.only)
        }
    );
    let mut section =
        |n: u8, title: &str, f: &mut dyn FnMut() -> anyhow::Result<String>| -> anyhow::Result<()> {
            if want(n) {
                eprintln!("== {n}. {title}");
                let table = f()?;
                println!("## {n}. {title}\n\n{table}");
                let _ = writeln!(body, "### {n}. {title}\n\n{table}");
            }
            Ok(())
        };
    section(1, "Bytes per member per round", &mut bytes_table)?;
    section(2, "Training and inference throughput", &mut || {
        throughput_table(&spec)
    })?;
    section(3, "Round time breakdown, 10 fd-node processes", &mut || {
        round_breakdown(&o.scratch, 3)
    })?;
    section(4, "Simulation scale", &mut || {
        scale_table(&o.scratch, &o.scale)
    })?;
    section(5, "Codec throughput", &mut || codec_table(o.repeats))?;
    section(6, "DP-SGD training cost", &mut || dp_table(&spec))?;
    section(7, "Secure aggregation cost", &mut || secure_table(o.repeats))?;
    section(8, "Seconds per round as the students learn", &mut || {
        flatness_table(&o.scratch, o.flat_rounds)
    })?;
    section(9, "Share transfer time: TCP, QUIC, relayed", &mut || {
        crate::netbench::transfer_table(o.repeats.max(5))
    })?;
    section(10, "10 fd-node processes over TCP and over QUIC", &mut || {
        transport_rounds_table(&o.scratch, 3)
    })?;
    if !o.no_write {
        write_section(&o.write, &body)?;
        eprintln!("written: {}", o.write.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> BenchOptions {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchOptions,
        }
        let args = std::iter::once("bench").chain(args.iter().copied());
        <Cli as clap::Parser>::parse_from(args).bench
    }

    #[test]
    fn throughput_options_select_models_and_optimizer() {
        let spec = ThroughputSpec::from_options(&options(&[
            "--models",
            "fedavg-cnn",
            "--optimizer",
            "sgd",
        ]))
        .unwrap();
        assert_eq!(spec.optimizer, OptimizerKind::Sgd);
        let names: Vec<String> = spec.models.iter().map(ModelConfig::name).collect();
        assert_eq!(names, ["fedavg-cnn"]);
        let all = ThroughputSpec::from_options(&options(&[])).unwrap();
        assert_eq!(all.optimizer, OptimizerKind::Adam);
        assert_eq!(all.models.len(), ModelConfig::zoo().len());
        let err = ThroughputSpec::from_options(&options(&["--optimizer", "lbfgs"])).unwrap_err();
        assert!(err.to_string().contains("--optimizer") && err.to_string().contains("lbfgs"));
        let err = ThroughputSpec::from_options(&options(&["--models", "vgg"])).unwrap_err();
        assert!(err.to_string().contains("--models") && err.to_string().contains("fedavg-cnn"));
    }

    #[test]
    fn round_seconds_are_summed_over_members_in_round_order() {
        let csv = "round,node,train_seconds,predict_seconds,encode_seconds,network_seconds,verify_seconds,aggregate_seconds,distill_seconds\n\
                   2,0,1.0,0.5,0,0,0,0,2.0\n\
                   1,0,1.0,0.25,0,0,0,0,1.0\n\
                   1,1,2.0,0.25,0,0,0,0,1.0\n\
                   2,1,3.5,0.5,0,0,0,0,4.0\n";
        let sums = per_round_step_seconds(csv).unwrap();
        assert_eq!(sums, vec![(1, [3.0, 0.5, 2.0]), (2, [4.5, 1.0, 6.0])]);
        let train: Vec<f64> = sums.iter().map(|(_, s)| s[0]).collect();
        assert_eq!(last_over_first(&train), 1.5);
        assert!(last_over_first(&[]).is_nan());
        let err = per_round_step_seconds("round,node,train_seconds\n1,0,1\n").unwrap_err();
        assert!(err.to_string().contains("predict_seconds"), "{err}");
        let err = per_round_step_seconds(
            "round,node,train_seconds,predict_seconds,distill_seconds\n1,0,fast,1,1\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("fast"), "{err}");
    }

    #[test]
    fn bench_section_is_replaced_not_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.md");
        std::fs::write(&path, "# P\n\nhand-written\n").unwrap();
        write_section(&path, "first\n").unwrap();
        write_section(&path, "second\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# P\n\nhand-written\n"));
        assert!(text.contains("second") && !text.contains("first"));
        assert_eq!(text.matches(BEGIN).count(), 1);
    }

    #[test]
    fn bytes_table_counts_real_frames() {
        let table = bytes_table().unwrap();
        // fedavg-cnn has 1,663,370 parameters; f32 shares of 1,000 × 10 are ~40 kB each.
        let row = table
            .lines()
            .find(|l| l.starts_with("| fedavg-cnn |") && l.contains("| 1000 |"))
            .unwrap();
        assert!(row.contains("| 1663370 |"), "{row}");
        let f32_bytes: u64 = row.split('|').nth(5).unwrap().trim().parse().unwrap();
        assert!(
            f32_bytes > 9 * 40_000 && f32_bytes < 9 * 40_400,
            "{f32_bytes}"
        );
    }
}

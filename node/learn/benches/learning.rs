//! Criterion benchmarks of the learning core, in the units users plan with:
//! training and prediction in samples per second per model, aggregation of
//! 100 peers × 1,000 samples × 10 classes per aggregator, and encode/decode
//! of a 1,000 × 10 share per payload encoding.
//!
//! `cargo bench -p fd-learn --bench learning`; docs/performance.md quotes it.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fd_learn::aggregate::{Aggregator, Contribution};
use fd_data::{DataSource, DataSplits};
use fd_learn::device::DeviceKind;
use fd_learn::learner::{Learner, OptimizerKind, TrainingConfig};
use fd_learn::model::{InputShape, ModelConfig};
use fd_protocol::PayloadEncoding;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 64;

fn data() -> DataSplits {
    DataSource::Synthetic {
        seed: 1,
        train: 2048,
        test: 256,
    }
    .load()
    .expect("synthetic data")
}

fn parse_kind(kind: &str) -> ModelConfig {
    toml::from_str(&format!("kind = \"{kind}\"")).unwrap()
}

fn zoo() -> Vec<ModelConfig> {
    ["mlp", "cnn", "fedavg-cnn", "resnet"]
        .into_iter()
        .map(parse_kind)
        .collect()
}

fn learner(model: &ModelConfig, data: &DataSplits, threads: usize) -> Learner {
    learner_with(model, data, threads, OptimizerKind::Adam)
}

fn learner_with(
    model: &ModelConfig,
    data: &DataSplits,
    threads: usize,
    optimizer: OptimizerKind,
) -> Learner {
    let config = TrainingConfig {
        batch_size: BATCH,
        local_epochs: 1,
        threads,
        optimizer,
        ..TrainingConfig::default()
    };
    Learner::new(
        model,
        config,
        DeviceKind::Flex,
        InputShape::new(data.train.shape),
        data.train.classes,
    )
}

fn training_and_prediction(c: &mut Criterion) {
    let data = data();
    let batch: Vec<usize> = (0..BATCH).collect();
    let public: Vec<usize> = (0..1000).collect();
    for threads in [1, 2] {
        let mut group = c.benchmark_group(format!("train_step_batch64_threads{threads}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(BATCH as u64));
        for model in zoo() {
            let mut l = learner(&model, &data, threads);
            group.bench_function(BenchmarkId::from_parameter(model.name()), |b| {
                b.iter(|| l.train_local(&data.train, &batch))
            });
        }
        group.finish();
        // Issue 7's reference setting: the FedAvg CNN with SGD + momentum.
        let mut group = c.benchmark_group(format!("train_step_sgd_batch64_threads{threads}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(BATCH as u64));
        let fedavg = parse_kind("fedavg-cnn");
        let mut l = learner_with(&fedavg, &data, threads, OptimizerKind::Sgd);
        group.bench_function(BenchmarkId::from_parameter(fedavg.name()), |b| {
            b.iter(|| l.train_local(&data.train, &batch))
        });
        group.finish();
        let mut group = c.benchmark_group(format!("predict_1000_threads{threads}"));
        group.sample_size(10);
        group.throughput(Throughput::Elements(public.len() as u64));
        for model in zoo() {
            let l = learner(&model, &data, threads);
            group.bench_function(BenchmarkId::from_parameter(model.name()), |b| {
                b.iter(|| l.predict(&data.train, &public))
            });
        }
        group.finish();
    }
}

/// One FedAvg-CNN layer (conv2: 32 → 64 channels, 5×5, padding 2, on a
/// 14×14 map, batch 64) forward and backward, on one thread:
/// `fd_learn::fastconv` against burn's own flex `conv2d`.
fn conv_layer(c: &mut Criterion) {
    use burn::prelude::*;
    use burn::tensor::ops::ConvOptions;
    let device = Device::flex().autodiff();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut random = |shape: [usize; 4]| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::<4>::from_data(TensorData::new(v, shape), &device)
    };
    let x = random([BATCH, 32, 14, 14]).require_grad();
    let w = random([64, 32, 5, 5]).require_grad();
    let mut group = c.benchmark_group("fedavg_conv2_batch64_threads1");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, fast) in [("fastconv", true), ("burn", false)] {
        group.bench_function(BenchmarkId::new("forward", name), |b| {
            b.iter(|| {
                pool.install(|| {
                    let out = if fast {
                        fd_learn::fastconv::conv2d(x.clone().inner(), w.clone().inner(), None, 1, 2)
                    } else {
                        burn::tensor::module::conv2d(
                            x.clone().inner(),
                            w.clone().inner(),
                            None,
                            ConvOptions::new([1, 1], [2, 2], [1, 1], 1),
                        )
                    };
                    out.into_data()
                })
            })
        });
        group.bench_function(BenchmarkId::new("forward_backward", name), |b| {
            b.iter(|| {
                pool.install(|| {
                    let out = if fast {
                        fd_learn::fastconv::conv2d(x.clone(), w.clone(), None, 1, 2)
                    } else {
                        burn::tensor::module::conv2d(
                            x.clone(),
                            w.clone(),
                            None,
                            ConvOptions::new([1, 1], [2, 2], [1, 1], 1),
                        )
                    };
                    let grads = out.sum().backward();
                    (w.grad(&grads), x.grad(&grads))
                })
            })
        });
    }
    group.finish();
}

fn random_logits(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-8.0..8.0)).collect()
}

fn aggregation(c: &mut Criterion) {
    let (peers, rows, classes) = (100, 1000, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let logits: Vec<Vec<f32>> = (0..peers)
        .map(|_| random_logits(&mut rng, rows * classes))
        .collect();
    let contributions: Vec<Contribution> = logits
        .iter()
        .enumerate()
        .map(|(i, l)| Contribution {
            logits: l,
            samples: 100 + i as u64,
            row_weights: None,
        })
        .collect();
    let mut group = c.benchmark_group("aggregate_100x1000x10");
    group.throughput(Throughput::Elements((peers * rows * classes) as u64));
    for aggregator in [
        Aggregator::Mean,
        Aggregator::MeanProbabilities,
        Aggregator::Weighted,
        Aggregator::Era { temperature: 0.1 },
        Aggregator::Median,
        Aggregator::TrimmedMean { beta: 0.1 },
    ] {
        let name = format!("{aggregator:?}");
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| aggregator.aggregate(&contributions, rows, classes).unwrap())
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let (rows, classes) = (1000u32, 10u32);
    let logits = random_logits(&mut ChaCha8Rng::seed_from_u64(9), (rows * classes) as usize);
    let mut group = c.benchmark_group("payload_1000x10");
    group.throughput(Throughput::Bytes((rows * classes * 4) as u64));
    for encoding in [
        PayloadEncoding::F32Le,
        PayloadEncoding::F16Le,
        PayloadEncoding::Int8,
        PayloadEncoding::TopK { k: 3 },
    ] {
        let payload = encoding.encode(&logits, classes).unwrap();
        group.bench_function(BenchmarkId::new("encode", encoding.name()), |b| {
            b.iter(|| encoding.encode(&logits, classes).unwrap())
        });
        group.bench_function(BenchmarkId::new("decode", encoding.name()), |b| {
            b.iter(|| encoding.decode(&payload, rows, classes).unwrap())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    training_and_prediction,
    conv_layer,
    aggregation,
    codec
);
criterion_main!(benches);

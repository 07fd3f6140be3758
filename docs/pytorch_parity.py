#!/usr/bin/env python3
"""PyTorch's side of the throughput table in docs/performance.md (issue 18).

The same measurement as `fd-sim bench --only 2` (simulations/src/bench.rs,
`throughput`), for the same models, on the CPU:
- training: steps of one batch of 64 random 1x28x28 inputs with labels
  (SGD, lr 0.01, momentum 0.9, cross-entropy), looped for at least 0.5 s;
  samples/s;
- prediction: one forward pass over 1,000 samples without gradients;
  samples/s;
each the median of 3 runs after one warm-up step, at 1 and 2 threads
(`torch.set_num_threads`).

Models, as fd's zoo builds them (node/learn/src/model.rs):
- mlp-200-200: 784-200-200-10, ReLU;
- fedavg-cnn: 5x5 convolutions with 32 and 64 channels (padding 2), each
  followed by ReLU and 2x2 max-pool, then 3136-512 ReLU, 512-10.

Run (PyTorch from PyPI, CPU):
    python3 docs/pytorch_parity.py
and, in the same hour on the same machine, fd's side:
    cargo run --bin fd-sim -- bench --only 2 --models mlp-200-200,fedavg-cnn \
        --devices flex --optimizer sgd --no-write
"""

import statistics
import time

import torch
from torch import nn

BATCH = 64
PREDICT = 1000
REPEATS = 3


def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, 10),
    )


def fedavg_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def throughput(build, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.rand(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))
    test = torch.rand(PREDICT, 1, 28, 28)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def predict():
        model.eval()
        with torch.no_grad():
            model(test)
        model.train()

    step()  # warm-up, as fd's bench
    predict()
    train, infer = [], []
    for _ in range(REPEATS):
        steps, start = 0, time.perf_counter()
        while steps < 2 or time.perf_counter() - start < 0.5:
            step()
            steps += 1
        train.append(steps * BATCH / (time.perf_counter() - start))
        start = time.perf_counter()
        predict()
        infer.append(PREDICT / (time.perf_counter() - start))
    return statistics.median(train), statistics.median(infer)


def main():
    print(f"PyTorch {torch.__version__}, CPU, batch {BATCH}, SGD lr 0.01 momentum 0.9")
    print("| model | threads | train samples/s | predict samples/s |")
    print("|---|---:|---:|---:|")
    for name, build in [("mlp-200-200", mlp), ("fedavg-cnn", fedavg_cnn)]:
        for threads in (1, 2):
            train, infer = throughput(build, threads)
            print(f"| {name} | {threads} | {train:,.0f} | {infer:,.0f} |")


if __name__ == "__main__":
    main()

"""The torch_loop baseline of experiments/bench.py: a FedAvg round as a per-client PyTorch loop.

This is the shape of a Flower + PyTorch simulation without its transport: for each sampled
client, load the global weights into the model, run `epochs` of shuffled mini-batch SGD
(batches sliced from the client's uint8 tensor and normalised on the fly, as a data loader
would), keep the state dict; then average the clients' state dicts weighted by example counts.
Same model, shapes, batch size, learning rate and synthetic data layout as bench.py's
workloads (W0 FedSparsify's 784-128-128-10 MLP, W1 the LEAF CNN), in NCHW.

Not a dependency of sparsefl_jax: run with an interpreter that has torch
(`pip install torch==2.13.0`, the CPU build). Prints one line `TORCH {json}`.

  python experiments/bench_torch.py --workload=W1 --clients=10 --rounds=5 --warmup=1
"""
import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch
from torch import nn

WORKLOADS = {  # name: (model, classes, (C, H, W), clients in the pool, examples, epochs, batch)
    "W0": ("fmnist_fc", 10, (1, 28, 28), 100, 600, 4, 32),
    "W1": ("leaf_cnn", 62, (1, 28, 28), 10, 256, 1, 32),
}


def fmnist_fc(classes: int) -> nn.Module:
  return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128),
                       nn.ReLU(), nn.Linear(128, classes))


def leaf_cnn(classes: int) -> nn.Module:
  return nn.Sequential(
      nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(3136, 2048), nn.ReLU(), nn.Linear(2048, classes))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", default="W1", choices=sorted(WORKLOADS))
  ap.add_argument("--clients", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--lr", type=float, default=0.01)
  args = ap.parse_args()
  name, classes, shape, pool, n, epochs, batch = WORKLOADS[args.workload]
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  xs = torch.from_numpy(rng.integers(0, 256, (pool, n) + shape, dtype=np.uint8))
  ys = torch.from_numpy(rng.integers(0, classes, (pool, n)).astype(np.int64))
  model = {"fmnist_fc": fmnist_fc, "leaf_cnn": leaf_cnn}[name](classes)
  global_state = {k: v.clone() for k, v in model.state_dict().items()}
  loss_fn = nn.CrossEntropyLoss()

  def fit(cid: int) -> dict:
    model.load_state_dict(global_state)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    model.train()
    for _ in range(epochs):
      order = torch.randperm(n)
      for b in range(0, n, batch):
        idx = order[b:b + batch]
        xb = (xs[cid, idx].float() / 255.0 - 0.5) / 0.25
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), ys[cid, idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

  def one_round() -> None:
    nonlocal global_state
    ids = rng.choice(pool, args.clients, replace=False)
    states = [fit(int(c)) for c in ids]
    weights = torch.full((len(ids),), float(n)) / (n * len(ids))
    global_state = {k: sum(w * s[k] for w, s in zip(weights, states)) for k in global_state}

  for _ in range(args.warmup):
    one_round()
  times = []
  for _ in range(args.rounds):
    t = time.perf_counter()
    one_round()
    times.append(time.perf_counter() - t)
  print("TORCH " + json.dumps({
      "seconds": statistics.median(times), "times": times, "compile_s": 0.0,
      "xla_temp_mb": float("nan"), "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "compiles_during_timing": 0,
      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()

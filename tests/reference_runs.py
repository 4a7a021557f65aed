"""Short reference runs of every method, recorded as fixtures so refactors stay bit-identical.

`python tests/reference_runs.py --write` records, for each run below, its `metrics.jsonl`
rows (all fields but `seconds`) and final parameters under `tests/fixtures/reference/`,
together with the machine they were recorded on; `tests/test_reference_runs.py` replays them.
Record anew only when an issue says a result must change, and say so in the commit.
"""
import argparse
import json
import os
import platform
import sys
from typing import Any, Dict, List, Tuple

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "reference")

_BASE = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=20, synthetic_test=40, num_clients=4,
             clients_per_round=3, batch_size=8, local_epochs=2, lr=0.1, momentum=0.5,
             rounds=3, progress=False, eval_every=1, seed=1, data_seed=2, init_seed=3,
             sampling_seed=4, checkpoint_every=0, tensorboard=False)
_CONV = dict(model="small_cnn", synthetic_shape="12,12,1")

# name -> config overrides: every registered method, ZeroFL's three uplinks, conv variants.
RUNS: Dict[str, Dict[str, Any]] = {
    "fedavg": dict(algorithm="fedavg"),
    "fedprox": dict(algorithm="fedprox", prox_mu=0.05),
    "fedadam": dict(algorithm="fedadam"),
    "fedavg_adam_optax": dict(algorithm="fedavg", server_optimizer="adam",
                              server_opt_impl="optax"),
    "swat": dict(algorithm="swat", sparsity=0.7, topk_period=2),
    "swat_conv": dict(algorithm="swat", sparsity=0.7, **_CONV),
    "zerofl_topk_weights": dict(algorithm="zerofl", sparsity=0.7, mask_ratio=0.1,
                                uplink="topk_weights"),
    "zerofl_diff_on_topk_weights": dict(algorithm="zerofl", sparsity=0.7, mask_ratio=0.1,
                                        uplink="diff_on_topk_weights"),
    "zerofl_topk_weights_diff": dict(algorithm="zerofl", sparsity=0.7, mask_ratio=0.1,
                                     uplink="topk_weights_diff", sparsity_distribution="erk"),
    "fedsparsify_global": dict(algorithm="fedsparsify_global", sparsity=0.8),
    "fedsparsify_local": dict(algorithm="fedsparsify_local", sparsity=0.8),
    "sparsyfed": dict(algorithm="sparsyfed", sparsity=0.8),
    "sparsyfed_conv_first_batch": dict(algorithm="sparsyfed", sparsity=0.8,
                                       act_threshold="first_batch", spectral_exponent=True,
                                       **_CONV),
    "topk": dict(algorithm="topk", sparsity=0.8),
}


def machine() -> Dict[str, str]:
  """Where a fixture was recorded: XLA:CPU results are bitwise stable on one CPU and jax
  version, not across CPU models (kernels pick other instruction paths)."""
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                   model)
  except OSError:
    pass
  return {"cpu": model, "jax": jax.__version__, "backend": jax.default_backend()}


def comparable_rows(workdir: str) -> List[Dict[str, Any]]:
  """A run's metrics.jsonl rows without `seconds` (wall-clock time: the only field that may
  differ between two runs of the same configuration)."""
  from sparsefl_jax.metrics import read_metrics
  return [{k: v for k, v in r.items() if k != "seconds"}
          for r in read_metrics(os.path.join(str(workdir), "metrics.jsonl"))]


def run_one(name: str, workdir: str) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray]]:
  """Runs reference `name` in `workdir`; returns (metrics rows without seconds, flat params)."""
  from sparsefl_jax import train
  from sparsefl_jax.config import ExperimentConfig
  cfg = ExperimentConfig(**{**_BASE, **RUNS[name]}, workdir=workdir)
  train.run(cfg)
  rows = comparable_rows(workdir)
  params = _final_params(cfg)
  return rows, params


def _final_params(cfg) -> Dict[str, np.ndarray]:
  from sparsefl_jax import train
  from sparsefl_jax.checkpoint import Checkpointer
  exp = train.build_experiment(cfg)
  ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  state = ckpt.restore(exp.init_state)[0]
  ckpt.close()
  flat, _ = jax.tree_util.tree_flatten_with_path((state.params, state.model_state))
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def write(names) -> None:
  import tempfile
  os.makedirs(FIXTURES, exist_ok=True)
  for name in names:
    with tempfile.TemporaryDirectory() as tmp:
      rows, params = run_one(name, os.path.join(tmp, name))
    with open(os.path.join(FIXTURES, f"{name}.jsonl"), "w") as f:
      for r in rows:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    np.savez_compressed(os.path.join(FIXTURES, f"{name}.npz"), **params)
    print("recorded", name, flush=True)
  with open(os.path.join(FIXTURES, "machine.json"), "w") as f:
    json.dump(machine(), f, indent=2, sort_keys=True)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--write", action="store_true", help="record the fixtures")
  parser.add_argument("names", nargs="*", help="runs to record (default: all)")
  args = parser.parse_args()
  if not args.write:
    sys.exit("pass --write to record the fixtures")
  write(args.names or list(RUNS))

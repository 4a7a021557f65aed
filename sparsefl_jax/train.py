"""The experiment loop: build data, model and algorithm from a config; run rounds; evaluate,
log metrics, checkpoint, resume. `experiments/run.py` is a thin absl wrapper around `run`.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax import algorithms, data, models
from sparsefl_jax.checkpoint import Checkpointer
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.data import preprocess
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated import client_map as client_map_lib
from sparsefl_jax.federated import evaluation, optimizers, sharding
from sparsefl_jax.federated import round as round_lib
from sparsefl_jax.federated.state import ClientData, ServerState
from sparsefl_jax.models import introspect
from sparsefl_jax.metrics import MetricsWriter, read_metrics, save_global_mask
from sparsefl_jax.progress import Progress
from sparsefl_jax.writers import make_writer

# Purpose tags folded into each seed, so equal seeds still give independent streams.
INIT_STREAM, SAMPLING_STREAM, TRAINING_STREAM = 1, 2, 3
# Settings that may differ between an interrupted run and its resumption.
RESUME_FREE_FIELDS = ("resume", "progress", "eval_batch_size", "keep_checkpoints",
                      "checkpoint_every", "plot_partition", "progress_every", "tensorboard")


@dataclasses.dataclass
class Experiment:
  """Everything built from a config; `round_step` is jitted and ready to call."""
  config: ExperimentConfig
  dataset: Any
  model: Any
  algorithm: algorithms.Algorithm
  client_data: ClientData
  round_step: round_lib.RoundStep
  train_key: jax.Array
  init_state: ServerState
  evaluate: Any
  test_batches: Any
  mesh: Any = None          # the client mesh when num_devices > 1


def build_dataset(cfg: ExperimentConfig):
  synthetic = None
  if cfg.dataset == "synthetic":
    synthetic = data.SyntheticSpec(example_shape=cfg.synthetic_example_shape,
                                   num_classes=cfg.synthetic_classes,
                                   examples_per_client=cfg.synthetic_examples,
                                   num_test=cfg.synthetic_test)
  return data.build_federated_dataset(
      cfg.dataset, num_clients=cfg.num_clients, partition=cfg.partition, alpha=cfg.alpha,
      classes_per_client=cfg.classes_per_client, data_seed=cfg.data_seed,
      data_dir=cfg.data_dir or None, val_fraction=cfg.val_fraction,
      min_partition_size=cfg.min_partition_size, synthetic=synthetic)


def assemble_model(algorithm: algorithms.Algorithm, model_name: str, num_classes: int,
                   dummy_x: jax.Array, init_key: jax.Array, conv_impl: str = "im2col"):
  """Initialises the model, applies the method's init, binds the layer order and rebuilds the
  model with the method's layer op (SWAT, Powerprop) if it has one.

  Returns (bound algorithm, model, params, model_state).
  """
  param_key, dropout_key, algo_key = jax.random.split(init_key, 3)
  model = models.get_model(model_name, num_classes, conv_impl=conv_impl)
  init_fn = jax.jit(lambda rngs, x: model.init(rngs, x, train=False))  # eager init is slow
  variables = dict(init_fn({"params": param_key, "dropout": dropout_key}, dummy_x))
  params = algorithm.init_params(variables.pop("params"), algo_key)
  model_state = variables
  order = introspect.weight_layer_order(model, {"params": params, **model_state}, dummy_x)
  algorithm, op = algorithm.setup(params, order)
  if op is not None:
    model = models.get_model(model_name, num_classes, conv_impl=conv_impl, op=op)
  return algorithm, model, params, model_state


def build_experiment(cfg: ExperimentConfig, dataset=None) -> Experiment:
  """Validates `cfg` and builds dataset, model, algorithm, initial state and the jitted round."""
  cfg.validate()
  algorithm = algorithms.get_algorithm(cfg.algorithm, cfg)
  if cfg.model not in models.MODELS:
    raise ConfigError(f"model={cfg.model!r} is not one of {list(models.MODELS)}")
  ds = dataset if dataset is not None else build_dataset(cfg)
  batch_fn = preprocess.make_batch_fn(ds)
  init_key = jax.random.fold_in(jax.random.PRNGKey(cfg.init_seed), INIT_STREAM)
  dummy = batch_fn(jnp.asarray(ds.train_x[0, :1]), jax.random.PRNGKey(0), False)
  algorithm, model, params, model_state = assemble_model(
      algorithm, cfg.model, ds.num_classes, dummy, init_key, conv_impl=cfg.conv_impl)

  server_name = cfg.resolved_server_optimizer(algorithm.default_server_optimizer)
  server_opt = optimizers.server_optimizer(
      server_name, cfg.resolved_server_lr(server_name), cfg.server_momentum, cfg.server_b1,
      cfg.server_b2, cfg.server_eps, impl=cfg.server_opt_impl)
  sampling_key = jax.random.fold_in(jax.random.PRNGKey(cfg.sampling_seed), SAMPLING_STREAM)
  state = round_lib.init_server_state(algorithm, params, model_state, server_opt,
                                      sampling_key)
  round_cfg = round_lib.RoundConfig(
      num_clients=ds.num_clients, clients_per_round=cfg.clients_per_round,
      local=client_lib.LocalConfig(cfg.local_epochs, cfg.batch_size, ds.max_examples),
      lr_schedule=optimizers.ClientLRSchedule(cfg.lr, cfg.lr_schedule, cfg.lr_end,
                                              cfg.lr_horizon or cfg.rounds),
      momentum=cfg.momentum, weight_decay=cfg.weight_decay,
      client_map=client_map_lib.resolve_client_map(cfg.client_map, params,
                                                   jax.default_backend()),
      client_chunk_size=cfg.client_chunk_size, comm_encoding=cfg.comm_encoding,
      num_devices=cfg.num_devices)
  mesh = round_lib.round_mesh(round_cfg)
  step = round_lib.jit_round_step(
      round_lib.build_round_step(algorithm, model, batch_fn, round_cfg, server_opt))
  evaluate = evaluation.make_eval_fn(algorithm, model, batch_fn)
  test_batches = evaluation.pad_eval_split(ds.test_x, ds.test_y, cfg.eval_batch_size)
  client_data = sharding.replicate(ClientData.from_arrays(ds.train_x, ds.train_y, ds.counts),
                                   mesh)
  state = sharding.replicate(state, mesh)
  train_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), TRAINING_STREAM)
  return Experiment(cfg, ds, model, algorithm, client_data, step, train_key, state, evaluate,
                    test_batches, mesh)


def _prepare_workdir(cfg: ExperimentConfig) -> None:
  try:
    os.makedirs(cfg.workdir, exist_ok=True)
    probe = os.path.join(cfg.workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir={cfg.workdir!r} is not writable ({e.strerror})") from None


def _check_resume_config(cfg: ExperimentConfig, path: str) -> None:
  with open(path) as f:
    old = json.load(f)
  new = dataclasses.asdict(cfg)
  diff = [k for k in new if k not in RESUME_FREE_FIELDS and old.get(k) != new[k]]
  if diff:
    k = diff[0]
    raise ConfigError(f"--resume with {k}={new[k]!r}, but the run in {cfg.workdir} used "
                      f"{k}={old.get(k)!r}; resume with the same settings or a new workdir")


def _round_row(t: int, metrics: Dict[str, Any], seconds: float) -> Dict[str, Any]:
  row: Dict[str, Any] = {"round": t}
  host = jax.device_get(metrics)
  per_client = {k: np.asarray(host.pop(k), np.int64) for k in list(host)
                if k.endswith("_per_client")}
  row["clients"] = np.asarray(host.pop("clients")).tolist()
  k = len(row["clients"])
  for name, v in per_client.items():   # uplink: sum over clients; downlink: K copies
    total = int(v.sum()) if v.ndim else k * int(v)
    row[name[:-len("_per_client")]] = total
  mask_bits = row.pop("uplink_mask_bits")
  # FedSparsify's transmission cost (Stripelis et al.): 32 bits per sent value + mask bits.
  row["transmitted_params"] = row["uplink_nnz"] + row["downlink_nnz"]
  row["fedsparsify_cost_mbits"] = (32 * row["transmitted_params"] + mask_bits) / 1e6
  for k, v in host.items():
    arr = np.asarray(v)
    row[k] = arr.item() if arr.ndim == 0 else arr.tolist()
  row["seconds"] = seconds
  return row


def run(cfg: ExperimentConfig, dataset=None, max_rounds: Optional[int] = None
        ) -> Dict[str, Any]:
  """Runs (or resumes) the experiment in cfg.workdir; returns the last metrics row.

  `max_rounds` stops this invocation after that many rounds (a checkpoint is written there),
  for time-sliced jobs; a later call with resume=True continues bit-identically.
  """
  cfg.validate()
  _prepare_workdir(cfg)
  exp = build_experiment(cfg, dataset)
  config_path = os.path.join(cfg.workdir, "config.json")
  metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")
  ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  writer = MetricsWriter(metrics_path)
  lead = jax.process_index() == 0   # multi-host: one process writes files (orbax coordinates)
  state = exp.init_state
  if cfg.resume and ckpt.latest_round() is not None:
    if os.path.exists(config_path):
      _check_resume_config(cfg, config_path)
    state, start = ckpt.restore(state)
    state = sharding.replicate(jax.tree.map(jnp.asarray, state), exp.mesh)
    writer.truncate_after(start)
    logging.info("resumed from round %d", start)
  elif ckpt.latest_round() is not None:
    raise ConfigError(f"workdir={cfg.workdir!r} already holds a run (checkpoint at round "
                      f"{ckpt.latest_round()}); pass --resume to continue it, or choose a new "
                      "--workdir")
  elif os.path.exists(metrics_path):
    os.remove(metrics_path)
  if lead:
    with open(config_path, "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=2, sort_keys=True)
  if cfg.plot_partition and lead:
    from sparsefl_jax import plots  # matplotlib only when asked for
    plots.plot_label_distribution(exp.dataset.label_counts(),
                                  os.path.join(cfg.workdir, "label_distribution.png"),
                                  title=_partition_title(cfg))

  first = int(state.round) + 1
  row: Dict[str, Any] = {}
  cumulative_up = sum(r.get("uplink_bytes", 0) for r in read_metrics(metrics_path))
  cumulative_down = sum(r.get("downlink_bytes", 0) for r in read_metrics(metrics_path))
  last = cfg.rounds if max_rounds is None else min(cfg.rounds, first - 1 + max_rounds)
  tb = make_writer(cfg.workdir, cfg.tensorboard and lead, first)
  progress = Progress(cfg.rounds, cfg.progress_every, enabled=cfg.progress and lead)
  for t in range(first, last + 1):
    start = time.perf_counter()
    state, metrics = exp.round_step(state, exp.client_data, exp.train_key)
    jax.block_until_ready(state.params)
    row = _round_row(t, metrics, time.perf_counter() - start)
    cumulative_up += row["uplink_bytes"]
    cumulative_down += row["downlink_bytes"]
    row["cumulative_uplink_bytes"] = cumulative_up
    row["cumulative_downlink_bytes"] = cumulative_down
    if (cfg.eval_every and t % cfg.eval_every == 0) or t == cfg.rounds:
      ev = exp.evaluate(state.params, state.model_state, state.algo_state, *exp.test_batches)
      row["test_loss"] = float(ev["loss"])
      row["test_accuracy"] = float(ev["accuracy"])
    if lead:
      writer.write(row)
    if tb is not None:
      tb.write(row)
    if cfg.mask_every and t % cfg.mask_every == 0 and lead:
      save_global_mask(os.path.join(cfg.workdir, "masks"), t, state.params)
    if (cfg.checkpoint_every and t % cfg.checkpoint_every == 0) or t == last:
      ckpt.save(t, state)
    progress.update(t, row)
  ckpt.close()
  progress.close()
  if tb is not None:
    tb.close()
  if not row:   # resumed a finished run: nothing to do, report where it ended
    done = read_metrics(metrics_path)
    row = done[-1] if done else {}
  return row


def _partition_title(cfg: ExperimentConfig) -> str:
  detail = {"lda": f"alpha={cfg.alpha:g}", "dirichlet": f"alpha={cfg.alpha:g}",
            "classes": f"{cfg.classes_per_client} classes per client"}.get(cfg.partition, "")
  return f"{cfg.dataset}: {cfg.partition} partition" + (f" ({detail})" if detail else "")


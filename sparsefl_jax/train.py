"""The experiment loop: build data, model and algorithm from a config; run rounds; evaluate,
log metrics, checkpoint, resume. `experiments/run.py` is a thin absl wrapper around `run`.
"""
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax import algorithms, data, distributed, guard, models, preflight
from sparsefl_jax.checkpoint import Checkpointer
from sparsefl_jax.config import (ConfigError, ExperimentConfig, config_from_json,
                                 config_to_json)
from sparsefl_jax.data import host_placement, preprocess
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated import client_map as client_map_lib
from sparsefl_jax.federated import evaluation, optimizers, probe, sharding
from sparsefl_jax.federated import round as round_lib
from sparsefl_jax.federated.state import ClientData, ServerState
from sparsefl_jax.models import introspect
from sparsefl_jax.metrics import (MetricsWriter, read_metrics, save_global_mask,
                                  write_json_atomic)
from sparsefl_jax.progress import Progress
from sparsefl_jax.stopping import RunInterrupted, StopRequest
from sparsefl_jax.workdir import WorkdirLock
from sparsefl_jax.writers import make_writer

# Purpose tags folded into each seed, so equal seeds still give independent streams.
INIT_STREAM, SAMPLING_STREAM, TRAINING_STREAM = 1, 2, 3
DATA_INIT_TAG = 1   # folded into the init stream's key: the probe batch of init_from_data
# Settings that may differ between an interrupted run and its resumption.
# Display-only settings and the folder's own path (a moved/copied run folder resumes: the
# folder is the run's identity). `rounds` has its own rule (`rounds_fixed_reason`).
RESUME_FREE_FIELDS = ("resume", "progress", "eval_batch_size", "keep_checkpoints",
                      "checkpoint_every", "plot_partition", "eval_every", "mask_every",
                      "allow_nonfinite", "workdir", "progress_every", "tensorboard",
                      "data_placement")
# Cumulative metrics.jsonl columns and the per-round column each sums; their running totals
# are saved with every checkpoint, so resume never rebuilds them from metrics.jsonl.
CUMULATIVE_FIELDS = {"cumulative_uplink_bytes": "uplink_bytes",
                     "cumulative_downlink_bytes": "downlink_bytes"}


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


def synthetic_spec(cfg: ExperimentConfig) -> Optional[data.SyntheticSpec]:
  """The synthetic data `cfg` asks for (None for a real data set)."""
  if cfg.dataset != "synthetic":
    return None
  return data.SyntheticSpec(example_shape=cfg.synthetic_example_shape,
                            num_classes=cfg.synthetic_classes,
                            examples_per_client=cfg.synthetic_examples,
                            num_test=cfg.synthetic_test)


def round_config(cfg: ExperimentConfig, num_clients: int, max_examples: int, params: Any
                 ) -> round_lib.RoundConfig:
  """The static round description of `cfg` (one definition for runs and sweep members)."""
  return round_lib.RoundConfig(
      num_clients=num_clients, clients_per_round=cfg.clients_per_round,
      local=client_lib.LocalConfig(cfg.local_epochs, cfg.batch_size, max_examples),
      lr_schedule=optimizers.ClientLRSchedule(cfg.lr, cfg.lr_schedule, cfg.lr_end,
                                              cfg.lr_horizon or cfg.rounds),
      momentum=cfg.momentum, weight_decay=cfg.weight_decay,
      client_map=client_map_lib.resolve_client_map(cfg.client_map, params,
                                                   jax.default_backend()),
      client_chunk_size=cfg.client_chunk_size, comm_encoding=cfg.comm_encoding,
      num_devices=cfg.num_devices, mask_metrics=cfg.mask_metrics)


def build_dataset(cfg: ExperimentConfig):
  synthetic = synthetic_spec(cfg)
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


class PhasedRoundStep:
  """`round_step(state, data, key)` that runs each round with its phase's compiled round.

  A method declaring phases (`Algorithm.round_phase`) gets one jitted round per phase, built
  on the phase's first round with its cohort size / local epochs (`phase_settings`) and
  compiled once; reading the round number costs one scalar device-to-host copy per round.
  """

  def __init__(self, algorithm: algorithms.Algorithm, build, round_cfg: round_lib.RoundConfig):
    self.algorithm, self._build, self.round_cfg = algorithm, build, round_cfg
    self._steps: Dict[str, round_lib.RoundStep] = {}
    self.has_phases = (type(algorithm).round_phase
                       is not algorithms.Algorithm.round_phase)

  def config_for_phase(self, phase: str) -> round_lib.RoundConfig:
    """The run's RoundConfig with the phase's cohort size and local epochs."""
    settings = self.algorithm.phase_settings(phase)
    rcfg = self.round_cfg
    if settings.clients_per_round is not None:
      k = settings.clients_per_round
      if not 1 <= k <= rcfg.num_clients:
        raise ConfigError(f"phase {phase!r}: clients_per_round={k} must lie in "
                          f"[1, num_clients={rcfg.num_clients}]")
      rcfg = dataclasses.replace(rcfg, clients_per_round=k)
    if settings.local_epochs is not None:
      if settings.local_epochs < 1:
        raise ConfigError(f"phase {phase!r}: local_epochs={settings.local_epochs} must be "
                          ">= 1")
      rcfg = dataclasses.replace(rcfg, local=dataclasses.replace(
          rcfg.local, epochs=settings.local_epochs))
    return rcfg

  def step_for_phase(self, phase: str) -> round_lib.RoundStep:
    if phase not in self._steps:
      self._steps[phase] = self._build(self.algorithm.for_phase(phase),
                                       self.config_for_phase(phase))
    return self._steps[phase]

  def step_for_round(self, t: int) -> round_lib.RoundStep:
    return self.step_for_phase(self.algorithm.round_phase(int(t)))

  def __call__(self, state: ServerState, data: ClientData, key: jax.Array):
    return self.step_for_round(int(state.round) + 1)(state, data, key)


def build_experiment(cfg: ExperimentConfig, dataset=None, client_source=None) -> Experiment:
  """Validates `cfg` and builds dataset, model, algorithm, initial state and the jitted round.

  With `cfg.data_placement == 'host'` the training split stays on the host:
  `exp.client_data` is a `host_placement` source (`client_source`, e.g. a `FlatClients`
  folder of a population too big for memory, else the dataset's arrays) and `exp.round_step`
  a `HostRoundStep` that streams each round's cohort; `dataset` then supplies the test split,
  classes and normalisation.
  """
  cfg.validate()
  if client_source is not None and cfg.data_placement != "host":
    raise ConfigError("a client_source is read only with data_placement='host' (got "
                      f"data_placement={cfg.data_placement!r})")
  host = cfg.data_placement == "host"
  sharding.check_processes(cfg.num_devices)   # several processes: the mesh spans them all
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
  if host:   # the training split never goes to the device as a whole
    client_data = (client_source if client_source is not None
                   else host_placement.ArrayClients.from_dataset(ds))
    num_clients, max_examples = client_data.num_clients, client_data.max_examples
  else:
    client_data = ClientData.from_arrays(ds.train_x, ds.train_y, ds.counts)
    num_clients, max_examples = ds.num_clients, ds.max_examples
  algo_state = algorithm.init_state(params)
  if probe.overrides_init_from_data(algorithm):   # SNIP, GraSP: prune from one batch
    probe_key = jax.random.fold_in(init_key, DATA_INIT_TAG)
    probe_data = (host_placement.probe_client_data(client_data, probe_key)
                  if host else client_data)
    params, algo_state = probe.run_init_from_data(
        algorithm, model, batch_fn, probe_data, params, model_state, algo_state,
        cfg.batch_size, probe_key)
  state = round_lib.init_server_state(algorithm, params, model_state, server_opt,
                                      sampling_key, algo_state=algo_state)
  round_cfg = round_config(cfg, num_clients, max_examples, params)
  mesh = round_lib.round_mesh(round_cfg)
  step = PhasedRoundStep(algorithm, lambda algo, rcfg: round_lib.jit_round_step(
      round_lib.build_round_step(algo, model, batch_fn, rcfg, server_opt,
                                 cohort_input=host)), round_cfg)
  if host:
    step = host_placement.HostRoundStep(step, mesh)
  elif not step.has_phases:
    step = step.step_for_phase("train")   # the plain jitted round (no host read of t)
  evaluate = evaluation.make_eval_fn(algorithm, model, batch_fn)
  test_batches = evaluation.pad_eval_split(ds.test_x, ds.test_y, cfg.eval_batch_size)
  if not host:
    client_data = sharding.replicate(client_data, mesh)
  state = sharding.replicate(state, mesh)
  train_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), TRAINING_STREAM)
  if jax.process_count() > 1:   # every input of the round a global (replicated) array
    train_key = sharding.replicate(train_key, mesh)
    test_batches = sharding.replicate(test_batches, mesh)
  return Experiment(cfg, ds, model, algorithm, client_data, step, train_key, state, evaluate,
                    test_batches, mesh)


def _prepare_workdir(cfg: ExperimentConfig) -> None:
  try:
    os.makedirs(cfg.workdir, exist_ok=True)
    probe = os.path.join(cfg.workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir={cfg.workdir!r} is not writable ({e.strerror})") from None


def load_run_config(path: str) -> ExperimentConfig:
  """The config a run folder was started with (`config.json`); errors name the file."""
  try:
    with open(path) as f:
      values = json.load(f)
    return config_from_json(values)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{path} is damaged ({e}); restore it or start a new --workdir") from None


def rounds_fixed_reason(cfg: ExperimentConfig) -> Optional[str]:
  """Why this run's schedule depends on the total round count (so `rounds` cannot change on
  resume), or None when the remaining rounds do not depend on it."""
  if cfg.lr_schedule == "exponential" and not cfg.lr_horizon:
    return ("lr_schedule='exponential' decays the LR from --lr to --lr_end over exactly "
            "--rounds rounds (set --lr_horizon to decouple them)")
  return algorithms.algorithm_class(cfg.algorithm).rounds_fixed_for(cfg)


def check_resume_config(cfg: ExperimentConfig, old: ExperimentConfig, path: str) -> None:
  """Refuses a resume whose settings change training; RESUME_FREE_FIELDS may differ, and
  `rounds` may change when `rounds_fixed_reason` is None."""
  new_d, old_d = dataclasses.asdict(cfg), dataclasses.asdict(old)
  diff = [k for k in new_d if k not in RESUME_FREE_FIELDS and k != "rounds"
          and old_d[k] != new_d[k]]
  if diff:
    k = diff[0]
    raise ConfigError(f"--resume with {k}={new_d[k]!r}, but the run in {cfg.workdir} used "
                      f"{k}={old_d[k]!r} ({path}); resume with the same settings or a new "
                      "workdir")
  if cfg.rounds != old.rounds:
    reason = rounds_fixed_reason(cfg)
    if reason:
      raise ConfigError(f"--resume with rounds={cfg.rounds}, but the run used rounds="
                        f"{old.rounds} and {reason}; keep --rounds={old.rounds} or start a "
                        "new workdir")


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
  Raises ConfigError (bad settings, busy or damaged workdir), `guard.Diverged` (NaN/inf) and
  `stopping.RunInterrupted` (SIGINT/SIGTERM, after a checkpoint).
  """
  cfg = cfg.validate().with_method_defaults()   # config.json and resume see every hyperparam
  preflight.check_before_data(cfg)
  _prepare_workdir(cfg)
  with WorkdirLock(cfg.workdir, distributed.lock_name()):
    stop = StopRequest().install()
    try:
      return _run_locked(cfg, dataset, max_rounds, stop)
    finally:
      stop.restore()


def _load_dataset(cfg: ExperimentConfig):
  """build_dataset with unreadable prepared data (a corrupt array_record) as one line."""
  try:
    return build_dataset(cfg)
  except (RuntimeError, OSError) as e:
    where = cfg.data_dir or os.environ.get("SPARSEFL_DATA_DIR") or "the default TFDS data dir"
    msg = " ".join(str(e).split())[:300]
    raise ConfigError(f"dataset={cfg.dataset!r} in {where} cannot be read ({msg}); delete "
                      "the prepared copy and prepare it again") from None


def _run_locked(cfg: ExperimentConfig, dataset, max_rounds: Optional[int],
                stop: StopRequest) -> Dict[str, Any]:
  config_path = os.path.join(cfg.workdir, "config.json")
  metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")
  ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  exp_box: list = []
  try:
    return _train(cfg, dataset, max_rounds, stop, ckpt, config_path, metrics_path, exp_box)
  finally:
    if exp_box and hasattr(exp_box[0].round_step, "close"):   # host placement's prefetcher
      exp_box[0].round_step.close()
    ckpt.close()


def _train(cfg, dataset, max_rounds, stop, ckpt, config_path, metrics_path, exp_box=None):
  writer = MetricsWriter(metrics_path)
  lead = jax.process_index() == 0   # multi-host: one process writes files (orbax coordinates)
  resuming = cfg.resume and ckpt.latest_round() is not None
  if resuming and os.path.exists(config_path):
    check_resume_config(cfg, load_run_config(config_path), config_path)
  elif not cfg.resume and ckpt.latest_round() is not None:
    raise ConfigError(f"workdir={cfg.workdir!r} already holds a run (checkpoint at round "
                      f"{ckpt.latest_round()}); pass --resume to continue it, or choose a new "
                      "--workdir")
  source = host_placement.open_host_data(cfg) if cfg.host_data_dir else None
  if source is not None:   # the folder is the training split; the dataset only the rest
    ds = dataset if dataset is not None else _load_dataset(
        cfg.replace(num_clients=1, partition="iid"))
    host_placement.check_matches(source, ds, cfg)
  else:
    ds = dataset if dataset is not None else _load_dataset(cfg)
    preflight.check_after_partition(cfg, ds)
  exp = build_experiment(cfg, ds, client_source=source)
  if exp_box is not None:
    exp_box.append(exp)
  state = exp.init_state
  counters = {name: 0 for name in CUMULATIVE_FIELDS}
  if resuming:
    restored, start, saved = ckpt.restore_verified(state)
    state = sharding.replicate(jax.tree.map(jnp.asarray, restored), exp.mesh)
    kept = writer.truncate_after(start) if lead else []
    if saved.get("legacy"):   # a checkpoint from before counters were saved with it
      saved = {name: sum(r.get(col, 0) for r in kept) for name, col in CUMULATIVE_FIELDS.items()}
    counters.update({k: v for k, v in saved.items() if k in counters})
    if lead and len(kept) < start:
      logging.warning("%s holds rows for %d of the %d restored rounds (missing or cut); "
                      "cumulative counters come from the checkpoint", metrics_path, len(kept),
                      start)
    logging.info("resumed from round %d", start)
  elif lead and os.path.exists(metrics_path):
    os.remove(metrics_path)
  if lead:
    write_json_atomic(config_path, config_to_json(cfg))
  if cfg.plot_partition and lead:
    from sparsefl_jax import plots  # matplotlib only when asked for
    plots.plot_label_distribution(exp.dataset.label_counts(),
                                  os.path.join(cfg.workdir, "label_distribution.png"),
                                  title=_partition_title(cfg))

  first = int(state.round) + 1
  last = cfg.rounds if max_rounds is None else min(cfg.rounds, first - 1 + max_rounds)
  tb = make_writer(cfg.workdir, cfg.tensorboard and lead, first)
  progress = Progress(cfg.rounds, cfg.progress_every, enabled=cfg.progress and lead)
  try:
    row = _rounds(cfg, exp, state, first, last, stop, ckpt, writer, tb, progress, counters,
                  lead)
  finally:
    progress.close()
    if tb is not None:
      tb.close()
  if not row:   # resumed a finished run: nothing to do, report where it ended
    done = read_metrics(metrics_path, tolerate_partial_last=True)
    row = done[-1] if done else {}
  return row


def _rounds(cfg, exp, state, first, last, stop, ckpt, writer, tb, progress, counters, lead
            ) -> Dict[str, Any]:
  """Rounds first..last: train, guard, log, checkpoint; returns the last row ({} if none)."""
  row: Dict[str, Any] = {}
  warned_nonfinite = False
  for t in range(first, last + 1):
    # signalled before this round: nothing new to save (several processes agree on it only
    # before the first round; later signals are agreed on after each round, below)
    if (t == first or jax.process_count() == 1) and _stop_requested(stop):
      raise RunInterrupted(f"{stop.name} before round {t}: nothing new to save; continue "
                           f"with --resume", 128 + stop.signum)
    start = time.perf_counter()
    state, metrics = exp.round_step(state, exp.client_data, exp.train_key)
    finite = guard.finite_flags(state, metrics.get("train_loss", jnp.zeros(())))
    jax.block_until_ready(state.params)
    row = _round_row(t, metrics, time.perf_counter() - start)
    for name, per_round in CUMULATIVE_FIELDS.items():
      counters[name] += row[per_round]
      row[name] = counters[name]
    bad = guard.bad_quantities(finite, {})
    if ((cfg.eval_every and t % cfg.eval_every == 0) or t == cfg.rounds) and not bad:
      ev = exp.evaluate(state.params, state.model_state, state.algo_state, *exp.test_batches)
      row["test_loss"] = float(ev["loss"])
      row["test_accuracy"] = float(ev["accuracy"])
      bad = guard.bad_quantities(finite, row)
    if lead:
      writer.write(row)
    if tb is not None:
      tb.write(row)
    if bad and not cfg.allow_nonfinite:
      good = ckpt.latest_round()
      kept = (f"last good checkpoint: round {good} in {ckpt.directory}" if good is not None
              else "no checkpoint was written")
      raise guard.Diverged(f"round {t}: {', '.join(bad)} not finite (NaN/inf); stopped "
                           f"without checkpointing it, {kept}; lower --lr, or pass "
                           "--allow_nonfinite to keep training")
    if bad and not warned_nonfinite:
      logging.warning("round %d: %s not finite; continuing (--allow_nonfinite)", t,
                      ", ".join(bad))
      warned_nonfinite = True
    if cfg.mask_every and t % cfg.mask_every == 0 and lead:
      save_global_mask(os.path.join(cfg.workdir, "masks"), t, state.params)
    saved = (cfg.checkpoint_every and t % cfg.checkpoint_every == 0) or t == last
    stopping = _stop_requested(stop)   # several processes: agreed, so all join the save
    if saved or stopping:
      ckpt.save(t, state, counters)
    if jax.process_count() == 1:   # one process: a signal during the save stops here too
      stopping = stop.signum is not None
    progress.update(t, row)
    if stopping and t < last:
      progress.close()
      raise RunInterrupted(f"{stop.name}: stopped after round {t} of {cfg.rounds}; "
                           f"checkpoint saved in {ckpt.directory}; continue with --resume",
                           128 + stop.signum)
  return row


def _stop_requested(stop: StopRequest) -> bool:
  """Whether to stop after this round. Several processes agree on it (one tiny all-gather a
  round), so a signal that reached only some of them still stops all at the same round and
  every process joins the checkpoint save."""
  if jax.process_count() == 1:
    return stop.signum is not None
  if distributed.any_process(stop.signum is not None):
    if stop.signum is None:   # another process was signalled: stop here too, as SIGTERM
      stop.signum = signal.SIGTERM
    return True
  return False


def _partition_title(cfg: ExperimentConfig) -> str:
  detail = {"lda": f"alpha={cfg.alpha:g}", "dirichlet": f"alpha={cfg.alpha:g}",
            "classes": f"{cfg.classes_per_client} classes per client"}.get(cfg.partition, "")
  return f"{cfg.dataset}: {cfg.partition} partition" + (f" ({detail})" if detail else "")


"""Sweeps: E experiments advanced together, one jitted program per round (vmap over E).

A paper table is sparsities × seeds × methods. Members of one *group* share the algorithm,
model, data set, population and every setting that fixes shapes or Python control flow
(clients per round, local epochs, batch size, rounds, ...); they may differ in

* seeds: `seed`, `data_seed`, `init_seed`, `sampling_seed` (for `dataset='synthetic'` the
  data seed also generates the examples, so there it separates groups);
* the partition: `partition`, `alpha`, `classes_per_client`, `min_partition_size`,
  `val_fraction` (per-member index maps over one shared copy of the examples);
* values the round can take as traced scalars: `lr`, `lr_end`, `momentum`, `weight_decay`,
  `server_lr`, `server_momentum`, `server_b1`, `server_b2`, `server_eps`, `sparsity`,
  `mask_ratio`, `beta`, `prox_mu`, `initial_sparsity` and float `method_args`.

How it works. Every member is first built as `train.build_experiment` would build it, with
Python values: the bound algorithm and its layer op, the `RoundConfig`, the server optimizer
settings, the initial state. The static objects of the members are then compared field by
field: what is equal stays a Python constant; a float that differs becomes a traced scalar
with one value per member (anything else that differs is refused in one line). One jitted
function vmaps `federated.round.build_round_step(...)` over the members, rebuilding each
member's algorithm with its traced values inside the trace (BUILD.md, "Traced
hyperparameters"); the round counter stays unbatched, so schedules stay `lax.cond`s.
The examples are stored once (`pool_x`, plus one zero row for padding); each member's
partition is an index map (P, M) into it, gathered inside the round. Evaluation is vmapped
the same way over the shared test split.

Equivalence (tests/test_sweep.py): a member's metrics and parameters equal the single run
with its flags bit for bit when only seeds and the partition differ (measured on this CPU);
a traced hyperparameter makes XLA compute with a run-time value instead of a folded
constant (and some hooks derive values in float32 instead of Python's float64), so those
members agree to a measured tolerance instead.

Memory grows linearly in E: E server states (params, model state, server optimizer and
method state), E rounds' client buffers at once (E·K clients in flight under the client
`vmap`, E under `map`), E (P, M) int32 index maps; the examples are shared. `run_sweep`
runs the members of a group in chunks of `chunk` members, so memory follows the chunk.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax import (algorithms, data, distributed, guard, models, preflight, traceable,
                          train)
from sparsefl_jax.algorithms.base import INIT_ONLY
from sparsefl_jax.checkpoint import CheckpointError, Checkpointer
from sparsefl_jax.config import SEED_FIELDS, ConfigError, ExperimentConfig, config_to_json
from sparsefl_jax.data import partition as partition_lib
from sparsefl_jax.data import preprocess, sources
from sparsefl_jax.federated import evaluation, optimizers, probe
from sparsefl_jax.federated import round as round_lib
from sparsefl_jax.federated.state import ClientData, ServerState
from sparsefl_jax.metrics import MetricsWriter, read_metrics, save_global_mask, write_json_atomic
from sparsefl_jax.progress import Progress
from sparsefl_jax.stopping import RunInterrupted, StopRequest
from sparsefl_jax.workdir import WorkdirLock
from sparsefl_jax.writers import make_writer

# Settings that only change the per-member index maps (the examples are shared).
PARTITION_FIELDS = ("partition", "alpha", "classes_per_client", "min_partition_size",
                    "val_fraction")
# Settings the round takes as traced scalars (a float that differs between members).
TRACED_FIELDS = ("lr", "lr_end", "momentum", "weight_decay", "server_lr", "server_momentum",
                 "server_b1", "server_b2", "server_eps", "sparsity", "mask_ratio", "beta",
                 "prox_mu", "initial_sparsity")
# Per-member run settings (outputs, display, resume): never part of the program.
RUN_FIELDS = ("workdir", "resume", "progress", "progress_every", "eval_every",
              "checkpoint_every", "keep_checkpoints", "plot_partition", "mask_every",
              "allow_nonfinite", "tensorboard")
SWEEPABLE_FIELDS = SEED_FIELDS + PARTITION_FIELDS + TRACED_FIELDS
SUMMARY_JSON, SUMMARY_MD, SWEEP_JSON = "sweep_summary.json", "sweep_summary.md", "sweep.json"
STATE_AXES = ServerState(round=None, params=0, model_state=0, opt_state=0, algo_state=0,
                         sampling_key=0)   # the round counter is shared: lax.cond stays a cond


# ---- grouping ------------------------------------------------------------------------------
def group_key(cfg: ExperimentConfig) -> Tuple[Tuple[str, Any], ...]:
  """What must be equal for two configs to share one program: every setting except the
  sweepable and the per-member run settings (and float method_args)."""
  free = set(SWEEPABLE_FIELDS) | set(RUN_FIELDS) | {"method_args"}
  if cfg.dataset == "synthetic":   # the data seed generates the examples themselves
    free.discard("data_seed")
  key = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in free]
  key += [(f"method_args.{k}", v) for k, v in cfg.method_args
          if isinstance(v, bool) or not isinstance(v, float)]
  return tuple(key)


def group_members(configs: Sequence[ExperimentConfig]) -> List[List[int]]:
  """Indices of `configs` split into groups that can share one program (first-seen order)."""
  groups: Dict[Tuple, List[int]] = {}
  for i, cfg in enumerate(configs):
    groups.setdefault(group_key(cfg), []).append(i)
  return list(groups.values())


# ---- static objects: compare the members, trace what differs --------------------------------
@dataclasses.dataclass(frozen=True)
class ServerOptSpec:
  """The server optimizer's settings (its lr, momentum, β1, β2 and τ may be traced)."""
  name: str
  lr: float
  momentum: float
  b1: float
  b2: float
  eps: float
  impl: str

  def build(self):
    return optimizers.server_optimizer(self.name, self.lr, self.momentum, self.b1, self.b2,
                                       self.eps, impl=self.impl)


def _leaves(obj: Any, path: Tuple = ()) -> List[Tuple[Tuple, Any]]:
  """(path, leaf) of a tree of dataclasses, tuples, lists and dicts (paths: field names,
  indices, keys). Fields declared with `algorithms.init_only_field` are left out: they shape
  only a member's own initial state, never the shared round."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    out = []
    for f in dataclasses.fields(obj):
      if f.metadata.get(INIT_ONLY):
        continue
      out += _leaves(getattr(obj, f.name), path + (f.name,))
    return out
  if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
    return [x for i, v in enumerate(obj) for x in _leaves(v, path + (i,))]
  if isinstance(obj, dict):
    return [x for k in sorted(obj) for x in _leaves(obj[k], path + (k,))]
  return [(path, obj)]


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (np.ndarray, jax.Array)) or isinstance(b, (np.ndarray, jax.Array)):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
  if type(a) is not type(b):
    return False
  try:
    return bool(a == b)
  except Exception:  # objects without a usable ==
    return a is b


def _is_float(v: Any) -> bool:
  if isinstance(v, bool):
    return False
  if isinstance(v, (float, np.floating)):
    return True
  return isinstance(v, (np.ndarray, jax.Array)) and jnp.issubdtype(v.dtype, jnp.floating)


STATIC_NAMES = ("algorithm", "layer_op", "round", "server_optimizer")   # Member.static


def _path_name(path: Tuple) -> str:
  return ".".join(str(p) for p in path)


def traced_paths(objects: Sequence[Any]) -> Tuple[Tuple, ...]:
  """Paths of the leaves that differ between the members' static objects; raises ConfigError
  (one line) when such a leaf is not a float (a shape, a count, a choice)."""
  flat = [_leaves(o) for o in objects]
  paths = []
  for j, (path, first) in enumerate(flat[0]):
    values = [f[j][1] for f in flat]
    if any(f[j][0] != path for f in flat):
      raise ConfigError(f"sweep members build differently structured {_path_name(path)}; "
                        "put them in separate sweeps")
    if all(_same(first, v) for v in values[1:]):
      continue
    if not all(_is_float(v) for v in values):
      shown = [v if np.ndim(v) == 0 else f"array{np.shape(v)}" for v in values]
      raise ConfigError(f"sweep members differ in {_path_name(path)}={shown}, which fixes "
                        "shapes or control flow and cannot be traced; sweep it in separate "
                        "groups (--sweep_chunk=1 runs every member alone)")
    paths.append(path)
  return tuple(paths)


def _get(obj: Any, path: Tuple) -> Any:
  for p in path:
    obj = getattr(obj, p) if dataclasses.is_dataclass(obj) else obj[p]
  return obj


def _replace(obj: Any, path: Tuple, value: Any) -> Any:
  """A copy of `obj` with the leaf at `path` set to `value` (dataclasses are rebuilt with
  `dataclasses.replace`, so their constructors check a concrete value as always)."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  if dataclasses.is_dataclass(obj):
    return dataclasses.replace(obj, **{head: _replace(getattr(obj, head), rest, value)})
  if isinstance(obj, tuple):
    return obj[:head] + (_replace(obj[head], rest, value),) + obj[head + 1:]
  if isinstance(obj, list):
    return obj[:head] + [_replace(obj[head], rest, value)] + obj[head + 1:]
  return {**obj, head: _replace(obj[head], rest, value)}


def rebuild(template: Any, paths: Sequence[Tuple], values: Sequence[Any]) -> Any:
  """`template` with each leaf at `paths` replaced by the corresponding (traced) value."""
  for path, value in zip(paths, values):
    template = _replace(template, path, value)
  return template


# ---- data: shared examples, per-member index maps --------------------------------------------
@dataclasses.dataclass(frozen=True)
class Examples:
  """The examples every member of a group shares: the training pool (one zero row at the end
  pads the index maps), the test split and the normalisation statistics."""
  pool_x: np.ndarray
  pool_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  augment: str
  raw: Any

  @property
  def pad_index(self) -> int:
    return self.pool_x.shape[0] - 1


def load_examples(cfg: ExperimentConfig) -> Examples:
  """Loads the centralised data set of `cfg` once (what `data.build_federated_dataset`
  partitions)."""
  synthetic = train.synthetic_spec(cfg)
  raw = sources.load_raw(cfg.dataset, num_clients=cfg.num_clients, data_seed=cfg.data_seed,
                         data_dir=cfg.data_dir or None, spec=synthetic)
  mean, std = data.channel_stats(raw.train_x)
  pool_x = np.concatenate([raw.train_x, np.zeros((1,) + raw.train_x.shape[1:],
                                                 raw.train_x.dtype)])
  pool_y = np.concatenate([raw.train_y, np.zeros((1,), np.int32)])
  return Examples(pool_x, pool_y, raw.test_x, raw.test_y, raw.num_classes, mean, std,
                  raw.augment, raw)


def member_parts(examples: Examples, cfg: ExperimentConfig) -> List[np.ndarray]:
  """Each client's example indices into the pool: exactly the partition (and validation
  hold-out) `data.federate` gives this config."""
  raw = examples.raw
  data._check_args(cfg.dataset, cfg.num_clients, cfg.partition, cfg.alpha,
                   cfg.classes_per_client, cfg.val_fraction, cfg.min_partition_size, False,
                   None)
  parts, _ = data.partition_indices(
      raw.train_y, num_clients=cfg.num_clients, partition=cfg.partition,
      num_classes=raw.num_classes, alpha=cfg.alpha, classes_per_client=cfg.classes_per_client,
      seed=cfg.data_seed, min_partition_size=cfg.min_partition_size, groups=raw.groups)
  empty = [p for p, idx in enumerate(parts) if idx.size == 0]
  if empty:
    raise ValueError(f"partition {cfg.partition!r} left clients {empty[:10]} without "
                     f"examples; use fewer clients or another partition")
  if cfg.val_fraction > 0:
    parts, _ = partition_lib.split_validation(parts, cfg.val_fraction, [cfg.data_seed, 1])
  return parts


def index_map(parts: Sequence[np.ndarray], width: int, pad_index: int
              ) -> Tuple[np.ndarray, np.ndarray]:
  """((P, width) int32 pool indices, padded with `pad_index`; (P,) int32 counts)."""
  counts = np.array([len(p) for p in parts], np.int32)
  index = np.full((len(parts), width), pad_index, np.int32)
  for i, p in enumerate(parts):
    index[i, :len(p)] = p
  return index, counts


class _Rows:
  """`pool[index[ids]]`: what `ClientData.x[ids]` is for a stacked data set."""

  def __init__(self, pool: jax.Array, index: jax.Array):
    self.pool, self.index = pool, index

  def __getitem__(self, ids):
    return self.pool[self.index[ids]]


class _MemberData:
  """One member's client data as the round reads it (x[ids], y[ids], counts[ids])."""

  def __init__(self, pool_x, pool_y, index, counts):
    self.x, self.y, self.counts = _Rows(pool_x, index), _Rows(pool_y, index), counts


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class SweepData:
  """Device data of a sweep chunk: the shared pool and the members' (E, P, M) index maps."""
  pool_x: jax.Array
  pool_y: jax.Array
  index: jax.Array
  counts: jax.Array

  def tree_flatten(self):
    return (self.pool_x, self.pool_y, self.index, self.counts), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


# ---- members and the program ---------------------------------------------------------------
@dataclasses.dataclass
class Member:
  """One member built with Python values, as `train.build_experiment` builds a run."""
  config: ExperimentConfig
  static: Tuple[Any, Any, round_lib.RoundConfig, ServerOptSpec]   # algorithm, op, round, server
  model: Any
  init_state: ServerState        # host arrays
  train_key: np.ndarray
  parts: List[np.ndarray]
  phases: Tuple[str, ...]


def build_member(cfg: ExperimentConfig, examples: Examples, width: int) -> Member:
  """The member's bound algorithm, layer op, RoundConfig (M = `width`), server optimizer and
  initial state, exactly as `train.build_experiment` derives them from `cfg`."""
  cfg.validate()
  if cfg.num_devices != 1:
    raise ConfigError(f"num_devices={cfg.num_devices}: a sweep runs on one device (its "
                      "members are its parallelism); accepted: 1")
  parts = member_parts(examples, cfg)
  own_width = max(len(p) for p in parts)
  algorithm = algorithms.get_algorithm(cfg.algorithm, cfg)
  batch_fn = _batch_fn(examples)
  index, counts = index_map(parts, own_width, examples.pad_index)
  first = examples.pool_x[index[0, :1]]
  init_key = jax.random.fold_in(jax.random.PRNGKey(cfg.init_seed), train.INIT_STREAM)
  dummy = batch_fn(jnp.asarray(first), jax.random.PRNGKey(0), False)
  algorithm, model, params, model_state = train.assemble_model(
      algorithm, cfg.model, examples.num_classes, dummy, init_key, conv_impl=cfg.conv_impl)
  op = getattr(model, "op", None)   # the layer op setup() returned (SWAT, Powerprop)
  server_name = cfg.resolved_server_optimizer(algorithm.default_server_optimizer)
  spec = ServerOptSpec(server_name, cfg.resolved_server_lr(server_name), cfg.server_momentum,
                       cfg.server_b1, cfg.server_b2, cfg.server_eps, cfg.server_opt_impl)
  server_opt = spec.build()
  sampling_key = jax.random.fold_in(jax.random.PRNGKey(cfg.sampling_seed),
                                    train.SAMPLING_STREAM)
  algo_state = algorithm.init_state(params)
  if probe.overrides_init_from_data(algorithm):   # SNIP: its own (unpadded) client data
    own = ClientData.from_arrays(examples.pool_x[index], examples.pool_y[index], counts)
    params, algo_state = probe.run_init_from_data(
        algorithm, model, batch_fn, own, params, model_state, algo_state, cfg.batch_size,
        jax.random.fold_in(init_key, train.DATA_INIT_TAG))
  state = round_lib.init_server_state(algorithm, params, model_state, server_opt,
                                      sampling_key, algo_state=algo_state)
  rcfg = train.round_config(cfg, cfg.num_clients, width, params)
  train_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), train.TRAINING_STREAM)
  phases = tuple(algorithm.round_phase(t) for t in range(1, cfg.rounds + 1))
  return Member(cfg, (algorithm, op, rcfg, spec), model, jax.device_get(state),
                np.asarray(train_key), parts, phases)


def _batch_fn(examples: Examples):
  return preprocess.make_batch_fn(examples)   # reads .mean, .std, .augment only


class SweepProgram:
  """The jitted functions shared by every chunk of a group: the round (one per phase), the
  evaluation and the finiteness guard, each vmapped over the members."""

  def __init__(self, members: Sequence[Member], examples: Examples):
    first = members[0]
    self.config = first.config
    self.template = first.static
    self.paths = traced_paths([m.static for m in members])
    phases = {m.phases for m in members}
    if len(phases) > 1:
      raise ConfigError("sweep members run different round phases (Algorithm.round_phase); "
                        "a sweep advances its members in lock step: sweep them separately")
    self.phases = first.phases
    self.model_name, self.num_classes = first.config.model, examples.num_classes
    self.conv_impl = first.config.conv_impl
    self.model = first.model
    self.batch_fn = _batch_fn(examples)
    self._steps: Dict[str, Callable] = {}
    self.checked = False
    self.evaluate = jax.jit(self._evaluate)
    self.finite = jax.jit(jax.vmap(guard.finite_flags, in_axes=(STATE_AXES, 0)))

  # -- the member's objects, rebuilt inside the trace from its traced values
  def hyper_values(self, members: Sequence[Member]) -> List[np.ndarray]:
    """(E, ...) float32 values of each traced leaf, one row per member."""
    return [np.stack([np.asarray(_get(m.static, p), np.float32) for m in members])
            for p in self.paths]

  def _objects(self, hp, phase: str = "train"):
    algorithm, op, rcfg, spec = rebuild(self.template, self.paths, hp)
    model = self.model
    if op is not None and any(p[0] == 1 for p in self.paths):
      model = models.get_model(self.model_name, self.num_classes, conv_impl=self.conv_impl,
                               op=op)
    return algorithm, model, rcfg, spec

  def step_for_phase(self, phase: str) -> Callable:
    """jit((state, data, train_keys, hp) -> (state, metrics)) for the rounds of `phase`."""
    if phase not in self._steps:
      template_algo, _, template_rcfg, _ = self.template
      phased = train.PhasedRoundStep(template_algo, None, template_rcfg)
      rcfg_phase = phased.config_for_phase(phase)

      def one(state, index, counts, key, hp, pool_x, pool_y):
        algorithm, model, rcfg, spec = self._objects(hp)
        rcfg = dataclasses.replace(rcfg, clients_per_round=rcfg_phase.clients_per_round,
                                   local=rcfg_phase.local)
        step = round_lib.build_round_step(algorithm.for_phase(phase), model, self.batch_fn,
                                          rcfg, spec.build())
        return step(state, _MemberData(pool_x, pool_y, index, counts), key)

      def sweep_step(state, sweep_data: SweepData, keys, hp):
        return jax.vmap(one, in_axes=(STATE_AXES, 0, 0, 0, 0, None, None),
                        out_axes=(STATE_AXES, 0))(state, sweep_data.index, sweep_data.counts,
                                                  keys, hp, sweep_data.pool_x,
                                                  sweep_data.pool_y)

      self._steps[phase] = jax.jit(sweep_step, donate_argnums=(0,))
    return self._steps[phase]

  def step_for_round(self, t: int) -> Callable:
    phase = (self.phases[t - 1] if t <= len(self.phases)
             else self.template[0].round_phase(t))   # --rounds grown on resume
    return self.step_for_phase(phase)

  def check(self, sweep: "Sweep") -> None:
    """Traces every phase's round and the evaluation once (no compilation), so a traced value
    that reaches a place needing a Python number fails here, in one line."""
    try:
      for phase in sorted(set(self.phases)):
        jax.eval_shape(self.step_for_phase(phase), sweep.init_state, sweep.data,
                       sweep.train_keys, sweep.hp)
      jax.eval_shape(self._evaluate, sweep.init_state, sweep.hp, *sweep.test_batches)
    except (traceable.TracedValueError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerBoolConversionError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      names = ", ".join(_path_name((STATIC_NAMES[p[0]],) + p[1:]) for p in self.paths)
      raise ConfigError(f"sweep members differ in {names}, which cannot be traced here "
                        f"({first}); sweep them in separate groups (--sweep_chunk=1 runs "
                        "every member alone)") from None

  def _evaluate(self, state: ServerState, hp, xb, yb, wb):
    def one(params, model_state, algo_state, hp):
      algorithm, model, _, _ = self._objects(hp)
      return evaluation.make_eval_fn(algorithm, model, self.batch_fn)(
          params, model_state, algo_state, xb, yb, wb)
    return jax.vmap(one)(state.params, state.model_state, state.algo_state, hp)


@dataclasses.dataclass
class Sweep:
  """E members on the device: call `round_step(state, data, train_keys, hp)` once per round.

  `state` is a ServerState whose leaves carry a leading member axis (the round counter is
  shared); `member_state(state, e)` is member e's ServerState, the state its single run has.
  """
  members: List[Member]
  program: SweepProgram
  data: SweepData
  init_state: ServerState
  train_keys: jax.Array
  hp: List[jax.Array]
  test_batches: Tuple[jax.Array, jax.Array, jax.Array]

  @property
  def configs(self) -> List[ExperimentConfig]:
    return [m.config for m in self.members]

  def round_step(self, state: ServerState, t: Optional[int] = None):
    """Advances every member by one round (round t = state.round + 1 unless given)."""
    t = int(state.round) + 1 if t is None else t
    return self.program.step_for_round(t)(state, self.data, self.train_keys, self.hp)

  def evaluate(self, state: ServerState) -> Dict[str, jax.Array]:
    """{'loss': (E,), 'accuracy': (E,)} on the shared test split."""
    return self.program.evaluate(state, self.hp, *self.test_batches)

  @staticmethod
  def member_state(state: ServerState, e: int) -> ServerState:
    return state._replace(**{f: jax.tree.map(lambda a: a[e], getattr(state, f))
                             for f in ServerState._fields if f != "round"})


def stack_states(states: Sequence[ServerState]) -> ServerState:
  """Members' states stacked on a leading axis (the shared round counter kept scalar)."""
  rounds = {int(s.round) for s in states}
  if len(rounds) != 1:
    raise ValueError(f"members are at different rounds {sorted(rounds)}")
  stacked = jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *states)
  return stacked._replace(round=jnp.asarray(states[0].round, jnp.int32))


def build_members(configs: Sequence[ExperimentConfig], examples: Optional[Examples] = None
                  ) -> Tuple[List[Member], Examples]:
  """Builds every member of one group (the index maps padded to the group's widest client)."""
  keys = {group_key(c) for c in configs}
  if len(keys) != 1:
    a, b = [dict(k) for k in list(keys)[:2]]
    diff = sorted(k for k in a if a[k] != b.get(k))
    raise ConfigError(f"sweep members differ in {diff}, which fix the program (shapes, "
                      f"model, algorithm); build one sweep per group (sweep.group_members)")
  examples = examples or load_examples(configs[0])
  width = max(max(len(p) for p in member_parts(examples, c)) for c in configs)
  return [build_member(c, examples, width) for c in configs], examples


def build_sweep(base: ExperimentConfig, members: Optional[Sequence[Any]] = None, *,
                examples: Optional[Examples] = None, program: Optional[SweepProgram] = None,
                built: Optional[Sequence[Member]] = None) -> Sweep:
  """A sweep over `members`: override dicts applied to `base` (or full ExperimentConfigs).

  With `members=None`, `base` is a sequence of ExperimentConfigs. All members must be one
  group (`group_members`); ConfigError (one line) otherwise or when a differing value cannot
  be traced.
  """
  if members is None:
    configs = list(base)
  else:
    configs = [m if isinstance(m, ExperimentConfig) else apply_overrides(base, m)
               for m in members]
  if built is None:
    built, examples = build_members(configs, examples)
  program = program or SweepProgram(built, examples)
  return materialize(built, program, examples)


def materialize(members: Sequence[Member], program: SweepProgram, examples: Examples) -> Sweep:
  """Puts a chunk of built members on the device."""
  width = members[0].static[2].local.max_examples
  maps = [index_map(m.parts, width, examples.pad_index) for m in members]
  sweep_data = SweepData(jnp.asarray(examples.pool_x), jnp.asarray(examples.pool_y, jnp.int32),
                         jnp.asarray(np.stack([i for i, _ in maps])),
                         jnp.asarray(np.stack([c for _, c in maps])))
  cfg = members[0].config
  test = evaluation.pad_eval_split(examples.test_x, examples.test_y, cfg.eval_batch_size)
  sweep = Sweep(list(members), program, sweep_data,
                stack_states([m.init_state for m in members]),
                jnp.asarray(np.stack([m.train_key for m in members])),
                [jnp.asarray(v) for v in program.hyper_values(members)], test)
  if jax.process_count() > 1:   # the member axis over every process's devices
    sweep = dataclasses.replace(
        sweep, data=SweepData(replicated(sweep_data.pool_x), replicated(sweep_data.pool_y),
                              by_member(sweep_data.index), by_member(sweep_data.counts)),
        init_state=place_state(sweep.init_state), train_keys=by_member(sweep.train_keys),
        hp=[by_member(v) for v in sweep.hp], test_batches=tuple(
            replicated(b) for b in test))
  if not program.checked:
    program.check(sweep)
    program.checked = True
  return sweep


# ---- several processes: the member axis sharded over all devices -------------------------------
# Members are independent, so the vmapped round partitions along the member axis with no
# collective; every process builds every member (same seeds, same host arrays) and places its
# own block. Outputs are read back with an all-gather, so every process sees every member and
# the decisions taken on them agree; process 0 writes the files.

def member_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh 'members' over every device of every process, in process order."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("members",))


def _global(x: Any, spec: Any) -> jax.Array:
  host = np.asarray(x)
  sharding = jax.sharding.NamedSharding(member_mesh(), spec)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def by_member(x: Any) -> jax.Array:
  """`x` (leading member axis) split over the member mesh."""
  return _global(x, jax.sharding.PartitionSpec("members"))


def replicated(x: Any) -> jax.Array:
  """`x` on every device of the member mesh."""
  return _global(x, jax.sharding.PartitionSpec())


def place_state(state: ServerState) -> ServerState:
  """A stacked ServerState on the member mesh (the shared round counter replicated)."""
  return state._replace(round=replicated(state.round), **{
      f: jax.tree.map(by_member, getattr(state, f)) for f in ServerState._fields if f != "round"})


def fetch(tree: Any) -> Any:
  """Host values of (possibly process-spanning) arrays: every process gets all members."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def offset_seeds(cfg: ExperimentConfig, offset: int) -> ExperimentConfig:
  """`cfg` with `offset` added to all four seeds (a sweep's seed replica `offset`)."""
  return cfg.replace(**{f: getattr(cfg, f) + offset for f in SEED_FIELDS}) if offset else cfg


def apply_overrides(base: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
  """`base` with `overrides`: config fields, or declared hyperparameters (into method_args)."""
  fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
  plain = {k: v for k, v in overrides.items() if k in fields}
  extra = {k: v for k, v in overrides.items() if k not in fields}
  cfg = base.replace(**plain)
  if extra:
    cfg = cfg.replace(method_args={**dict(cfg.method_args), **extra})
  return cfg


# ---- running a sweep: one workdir per member, exactly what `train.run` writes ----------------
@dataclasses.dataclass
class _Output:
  """One member's outputs (what `train._train` keeps for a run)."""
  config: ExperimentConfig
  lock: WorkdirLock
  ckpt: Checkpointer
  writer: MetricsWriter
  counters: Dict[str, int]
  tb: Any = None
  row: Dict[str, Any] = dataclasses.field(default_factory=dict)
  status: str = "running"       # running | done | diverged | stopped
  message: str = ""


def member_name(overrides: Mapping[str, Any]) -> str:
  """The folder name of a member: its swept values, e.g. 'sparsity=0.9,seed_offset=1'."""
  if not overrides:
    return "base"
  return ",".join(f"{k}={_fmt(v)}" for k, v in overrides.items())


def _fmt(v: Any) -> str:
  return f"{v:g}" if isinstance(v, float) else str(v)


def run_sweep(configs: Sequence[ExperimentConfig], *, chunk: int = 0,
              max_rounds: Optional[int] = None, names: Optional[Sequence[str]] = None,
              summary_dir: Optional[str] = None, examples_cache: Optional[Dict] = None
              ) -> List[Dict[str, Any]]:
  """Runs (or, with `resume=True` in the configs, resumes) every member in its own workdir.

  Members are split into groups (`group_members`); each group runs in chunks of `chunk`
  members (0 = the whole group at once), every chunk one jitted program per round. Each
  member's workdir receives exactly what `train.run` writes for its config: config.json,
  metrics.jsonl (`seconds` is the chunk's round time), TensorBoard events, checkpoints. A
  member that diverges stops being written (its last good checkpoint stays) while the others
  go on. Returns one summary dict per member (name, status, its last row); with
  `summary_dir` also writes the sweep summary table there. Raises ConfigError (one line) for
  a bad member and `RunInterrupted` on SIGINT/SIGTERM (after checkpointing every member).
  """
  if chunk < 0:
    raise ConfigError(f"sweep_chunk={chunk} must be >= 0 (0 = each group at once)")
  configs = [c.validate().with_method_defaults() for c in configs]
  names = list(names) if names is not None else [os.path.basename(c.workdir) for c in configs]
  dirs = [os.path.abspath(c.workdir) for c in configs]
  if len(set(dirs)) != len(dirs):
    twice = sorted({d for d in dirs if dirs.count(d) > 1})
    raise ConfigError(f"sweep members share workdir {twice[0]!r}; give each its own")
  for c in configs:   # several processes: the members, not one run, span them
    preflight.check_before_data(c, spans_processes=False)
  cache = examples_cache if examples_cache is not None else {}
  results: Dict[int, Dict[str, Any]] = {}
  stop = StopRequest().install()
  try:
    for group in group_members(configs):
      _run_group([configs[i] for i in group], group, chunk, max_rounds, stop, cache, results)
  finally:
    stop.restore()
    if summary_dir and distributed.is_lead():
      write_summary(summary_dir, [dict(results.get(i, {}), name=names[i]) for i in
                                  range(len(configs))], configs)
  return [dict(results[i], name=names[i]) for i in range(len(configs))]


def _examples_key(cfg: ExperimentConfig) -> Tuple:
  seeded = cfg.dataset == "synthetic"
  return (cfg.dataset, cfg.data_dir, cfg.synthetic_shape, cfg.synthetic_classes,
          cfg.synthetic_examples, cfg.synthetic_test, cfg.num_clients if seeded else None,
          cfg.data_seed if seeded else None)


def _run_group(configs, indices, chunk, max_rounds, stop, cache, results) -> None:
  key = _examples_key(configs[0])
  if key not in cache:
    try:
      cache[key] = load_examples(configs[0])
    except (RuntimeError, OSError) as e:
      msg = " ".join(str(e).split())[:300]
      raise ConfigError(f"dataset={configs[0].dataset!r} cannot be read ({msg})") from None
  examples = cache[key]
  for c in configs:   # the batch size against the member's largest client
    largest = max(len(p) for p in member_parts(examples, c))
    if c.batch_size > largest:
      raise ConfigError(f"batch_size={c.batch_size} exceeds every client of {c.workdir}: the "
                        f"largest holds {largest} examples; accepted: 1..{largest}")
  built, examples = build_members(configs, examples)
  program = SweepProgram(built, examples)
  # Members at the same round run together; finished ones only report their last row.
  starts = [_latest_round(c) for c in configs]
  by_start: Dict[int, List[int]] = {}
  for j, s in enumerate(starts):
    by_start.setdefault(s, []).append(j)
  devices = jax.device_count() if jax.process_count() > 1 else 1
  for s, js in sorted(by_start.items()):
    size = chunk or len(js)
    for k in range(0, len(js), size):
      part = js[k:k + size]
      if len(part) % devices:
        raise ConfigError(
            f"a chunk of {len(part)} sweep members cannot be split over the {devices} devices "
            f"of {jax.process_count()} processes; accepted: members (or --sweep_chunk) "
            f"a multiple of {devices} in every group")
      rows = _run_chunk([built[j] for j in part], program, examples, max_rounds, stop)
      for j, r in zip(part, rows):
        results[indices[j]] = r


def _latest_round(cfg: ExperimentConfig) -> int:
  ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
  # Several processes: the same answer everywhere (opening a Checkpointer is collective, and
  # another process may just have created the folder).
  if not distributed.any_process(os.path.isdir(ckpt_dir)):
    return 0
  ckpt = Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints)
  try:
    return ckpt.latest_round() or 0
  finally:
    ckpt.close()


def _open_outputs(members: Sequence[Member]) -> List[_Output]:
  outs: List[_Output] = []
  try:
    for m in members:
      cfg = m.config
      train._prepare_workdir(cfg)
      lock = WorkdirLock(cfg.workdir, distributed.lock_name()).acquire()
      ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints)
      outs.append(_Output(cfg, lock, ckpt, MetricsWriter(os.path.join(cfg.workdir,
                                                                      "metrics.jsonl")),
                          {name: 0 for name in train.CUMULATIVE_FIELDS}))
  except BaseException:
    _close_outputs(outs)
    raise
  return outs


def _close_outputs(outs: Sequence[_Output]) -> None:
  for o in outs:
    if o.tb is not None:
      o.tb.close()
    o.ckpt.close()
    o.lock.release()


def _restore(members: Sequence[Member], outs: Sequence[_Output]) -> List[ServerState]:
  """Each member's state to start from: all at one common round (the newest round every
  member can restore; 0 = fresh). Checkpoints past it are dropped (they are re-made, bit for
  bit the same training)."""
  lead = distributed.is_lead()   # several processes: process 0 rewrites the files
  for m, o in zip(members, outs):
    cfg, latest = m.config, o.ckpt.latest_round()
    config_path = os.path.join(cfg.workdir, "config.json")
    if cfg.resume and latest is not None and os.path.exists(config_path):
      train.check_resume_config(cfg, train.load_run_config(config_path), config_path)
    elif not cfg.resume and latest is not None:
      raise ConfigError(f"workdir={cfg.workdir!r} already holds a run (checkpoint at round "
                        f"{latest}); pass --resume to continue it, or choose a new --workdir")
  while True:   # the newest round every member holds (0 = fresh)
    common = max(set.intersection(*[set(o.ckpt.all_rounds()) | {0} for o in outs]))
    states, saved_counters = [], []
    try:
      for m, o in zip(members, outs):
        if common == 0:
          states.append(m.init_state)
          saved_counters.append({})
          continue
        restored, _, saved = o.ckpt.restore_verified(m.init_state, round_index=common)
        states.append(restored)
        saved_counters.append(saved)
    except CheckpointError:   # that member's step was damaged (now quarantined): choose again
      continue
    break
  for o, saved in zip(outs, saved_counters):
    for r in o.ckpt.all_rounds():
      if r > common:   # re-made by this run, bit for bit (a member ahead of the others)
        o.ckpt._manager.delete(r)   # pylint: disable=protected-access
    if common:
      kept = (o.writer.truncate_after(common) if lead else
              [r for r in read_metrics(o.writer.path, tolerate_partial_last=True)
               if r.get("round", 0) <= common])
      if saved.get("legacy"):   # a checkpoint from before counters were saved with it
        saved = {n: sum(r.get(col, 0) for r in kept)
                 for n, col in train.CUMULATIVE_FIELDS.items()}
      o.counters.update({k: v for k, v in saved.items() if k in o.counters})
      o.row = kept[-1] if kept else {}
      logging.info("%s: resumed from round %d", o.config.workdir, common)
    elif lead and os.path.exists(o.writer.path):
      os.remove(o.writer.path)
  distributed.barrier("sparsefl_sweep_restored")   # no process reads a file being rewritten
  return [jax.tree.map(np.asarray, s) for s in states]


def _run_chunk(members: Sequence[Member], program: SweepProgram, examples: Examples,
               max_rounds: Optional[int], stop: StopRequest) -> List[Dict[str, Any]]:
  outs = _open_outputs(members)
  try:
    states = _restore(members, outs)
    for m, o in zip(members, outs):
      if not distributed.is_lead():   # several processes: process 0 writes the files
        continue
      write_json_atomic(os.path.join(m.config.workdir, "config.json"), config_to_json(m.config))
      if m.config.plot_partition:
        from sparsefl_jax import plots
        counts = np.stack([np.bincount(examples.pool_y[p], minlength=examples.num_classes)
                           for p in m.parts])
        plots.plot_label_distribution(counts, os.path.join(m.config.workdir,
                                                           "label_distribution.png"),
                                      title=train._partition_title(m.config))
    sweep = materialize(members, program, examples)
    start = int(states[0].round)
    rounds = members[0].config.rounds
    last = rounds if max_rounds is None else min(rounds, start + max_rounds)
    for o in outs:
      o.tb = make_writer(o.config.workdir, o.config.tensorboard and distributed.is_lead(),
                         start + 1)
      if start >= rounds:
        o.status = "done"
    state = stack_states(states)
    progress = Progress(rounds, members[0].config.progress_every,
                        enabled=members[0].config.progress and distributed.is_lead())
    try:
      _sweep_rounds(sweep, state, start + 1, last, outs, stop, progress)
    finally:
      progress.close()
    for o in outs:
      if o.status == "running":
        o.status = "done" if last == rounds else "paused"
    return [{"status": o.status, "message": o.message, "workdir": o.config.workdir,
             "row": o.row} for o in outs]
  finally:
    _close_outputs(outs)


def _slice(tree: Any, e: int) -> Any:
  return jax.tree.map(lambda a: a[e], tree)


def _sweep_rounds(sweep: Sweep, state: ServerState, first: int, last: int,
                  outs: Sequence[_Output], stop: StopRequest, progress: Progress) -> None:
  """Rounds first..last of a chunk: one sweep step, then each member's row, guard, eval,
  masks and checkpoint exactly as `train._rounds` does them for one run."""
  lead = distributed.is_lead()   # several processes: process 0 writes the files
  for t in range(first, last + 1):
    if stop.signum is not None and jax.process_count() == 1:   # several: agreed after a round
      raise RunInterrupted(f"{stop.name} before round {t}: nothing new to save; continue "
                           f"with --resume", 128 + stop.signum)
    start = time.perf_counter()
    state, metrics = sweep.round_step(state, t)
    flags = sweep.program.finite(state, metrics["train_loss"])
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - start
    host = fetch(metrics)
    flags = np.asarray(fetch(flags))
    signalled = train._stop_requested(stop)   # several processes: agreed, after this round
    live = [o.status == "running" for o in outs]
    rows: List[Optional[Dict[str, Any]]] = [None] * len(outs)
    bads: List[List[str]] = [[] for _ in outs]
    for e, o in enumerate(outs):
      if not live[e]:
        continue
      row = train._round_row(t, _slice(host, e), seconds)
      for name, per_round in train.CUMULATIVE_FIELDS.items():
        o.counters[name] += row[per_round]
        row[name] = o.counters[name]
      rows[e], bads[e] = row, guard.bad_quantities(flags[e], {})
    wants_eval = [live[e] and not bads[e] and ((o.config.eval_every and
                                                t % o.config.eval_every == 0)
                                               or t == o.config.rounds)
                  for e, o in enumerate(outs)]
    if any(wants_eval):
      ev = fetch(sweep.evaluate(state))
      for e in range(len(outs)):
        if wants_eval[e]:
          rows[e]["test_loss"] = float(ev["loss"][e])
          rows[e]["test_accuracy"] = float(ev["accuracy"][e])
          bads[e] = guard.bad_quantities(flags[e], rows[e])
    member_states = mask_params = None   # host copies, fetched once per round when needed
    for e, o in enumerate(outs):
      if not live[e]:
        continue
      cfg, row = o.config, rows[e]
      if lead:
        o.writer.write(row)
      if o.tb is not None:
        o.tb.write(row)
      o.row = row
      if bads[e] and not cfg.allow_nonfinite:
        good = o.ckpt.latest_round()
        kept = (f"last good checkpoint: round {good} in {o.ckpt.directory}" if good is not None
                else "no checkpoint was written")
        o.status, o.message = "diverged", (
            f"round {t}: {', '.join(bads[e])} not finite (NaN/inf); stopped without "
            f"checkpointing it, {kept}; lower --lr, or pass --allow_nonfinite to keep training")
        logging.warning("%s: %s", cfg.workdir, o.message)
        continue
      saved = (cfg.checkpoint_every and t % cfg.checkpoint_every == 0) or t == last
      if member_states is None and (saved or signalled):
        member_states = fetch(state)   # collective (several processes): all take part
      if cfg.mask_every and t % cfg.mask_every == 0:
        if mask_params is None:
          mask_params = (member_states.params if member_states is not None
                         else fetch(state.params))
        if lead:
          save_global_mask(os.path.join(cfg.workdir, "masks"), t, _slice(mask_params, e))
      if saved or signalled:
        o.ckpt.save(t, Sweep.member_state(member_states, e), o.counters)
    shown = next((r for r in rows if r is not None), None)
    if shown is not None:
      progress.update(t, shown)
    if signalled and t < last:
      progress.close()
      for o in outs:
        if o.status == "running":
          o.status = "stopped"
      raise RunInterrupted(f"{stop.name}: stopped after round {t} of {outs[0].config.rounds}; "
                           f"checkpoints saved in every member's workdir; continue with "
                           f"--resume", 128 + stop.signum)
    if not any(o.status == "running" for o in outs):
      break


# ---- the summary table -----------------------------------------------------------------------
SUMMARY_COLUMNS = ("test_accuracy", "test_loss", "train_loss", "global_density",
                   "cumulative_uplink_bytes", "cumulative_downlink_bytes")


def write_summary(directory: str, results: Sequence[Dict[str, Any]],
                  configs: Sequence[ExperimentConfig]) -> str:
  """`sweep_summary.json` and `sweep_summary.md` in `directory`: one row per member (its
  last round), then mean ± std over members that differ only in their seeds."""
  os.makedirs(directory, exist_ok=True)
  members = []
  for r, cfg in zip(results, configs):
    row = r.get("row") or {}
    if not row:   # finished earlier: the last row of its metrics.jsonl
      done = read_metrics(os.path.join(cfg.workdir, "metrics.jsonl"), tolerate_partial_last=True)
      row = done[-1] if done else {}
    members.append({"name": r.get("name", ""), "status": r.get("status", "not run"),
                    "workdir": cfg.workdir, "round": row.get("round", 0),
                    **{c: row.get(c) for c in SUMMARY_COLUMNS}})
  groups: Dict[str, List[Dict[str, Any]]] = {}
  for m in members:
    groups.setdefault(_without_seed(m["name"]), []).append(m)
  stats = []
  for name, ms in groups.items():
    entry = {"name": name, "members": len(ms)}
    for c in SUMMARY_COLUMNS:
      vals = [m[c] for m in ms if isinstance(m[c], (int, float))]
      entry[c] = ({"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1))
                   if len(vals) > 1 else 0.0} if vals else None)
    stats.append(entry)
  write_json_atomic(os.path.join(directory, SUMMARY_JSON), {"members": members,
                                                            "over_seeds": stats})
  lines = ["| member | status | round | test acc | test loss | density | up MB | down MB |",
           "|---|---|---|---|---|---|---|---|"]
  for m in members:
    lines.append(f"| {m['name']} | {m['status']} | {m['round']} | {_num(m['test_accuracy'])} | "
                 f"{_num(m['test_loss'])} | {_num(m['global_density'])} | "
                 f"{_mb(m['cumulative_uplink_bytes'])} | {_mb(m['cumulative_downlink_bytes'])} |")
  lines += ["", "Mean ± std (sample, n − 1) over the seeds of each setting:", "",
            "| setting | seeds | test acc | test loss | density |", "|---|---|---|---|---|"]
  for s in stats:
    lines.append(f"| {s['name']} | {s['members']} | {_pm(s['test_accuracy'])} | "
                 f"{_pm(s['test_loss'])} | {_pm(s['global_density'])} |")
  text = "\n".join(lines) + "\n"
  with open(os.path.join(directory, SUMMARY_MD), "w") as f:
    f.write(text)
  return text


def _without_seed(name: str) -> str:
  parts = [p for p in name.split(",") if not p.startswith("seed_offset=")]
  return ",".join(parts) or "base"


def _num(v: Any) -> str:
  return f"{v:.4f}" if isinstance(v, (int, float)) else "–"


def _mb(v: Any) -> str:
  return f"{v / 1e6:.2f}" if isinstance(v, (int, float)) else "–"


def _pm(s: Optional[Dict[str, float]]) -> str:
  return f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "–"

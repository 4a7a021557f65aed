"""The algorithm contract v2: binding that cannot be skipped, capabilities, registration."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import algorithms, train
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.algorithms.base import UnboundAlgorithmError
from sparsefl_jax.algorithms.fedavg import FedAvg
from sparsefl_jax.algorithms.sparsyfed import SparsyFed
from sparsefl_jax.algorithms.zerofl import SwatFL, ZeroFL

PARAMS = {"fc1": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros((8,))},
          "fc2": {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros((3,))}}


@pytest.mark.parametrize("algo", [ZeroFL(sparsity=0.5), SwatFL(sparsity=0.5)])
def test_unbound_zerofl_refuses_instead_of_guessing_layers_by_name(algo):
  with pytest.raises(UnboundAlgorithmError, match=r"setup\(\)"):
    algo.densities()
  with pytest.raises(UnboundAlgorithmError):
    algo.client_context(PARAMS, (), jnp.int32(1))


def test_unbound_sparsyfed_refuses():
  with pytest.raises(UnboundAlgorithmError, match="SparsyFed.client_init"):
    SparsyFed(sparsity=0.5).client_init(PARAMS, {}, jnp.int32(1), None)


def test_setup_binds_in_call_order():
  # Call order fc2 before fc1: the default sparse set excludes the LAST CALLED layer (fc1),
  # where name order would have excluded fc2.
  algo, _ = ZeroFL(sparsity=0.5).setup(PARAMS, ("fc2", "fc1"))
  assert algo.bound and [n for n, _ in algo.densities()] == ["fc2"]
  dense, op = FedAvg().setup(PARAMS, ("fc1", "fc2"))
  assert dense.bound and op is None and not FedAvg().bound


def test_round_step_refuses_an_unbound_algorithm():
  from sparsefl_jax.federated import round as round_lib
  with pytest.raises(UnboundAlgorithmError, match="build_round_step"):
    round_lib.build_round_step(ZeroFL(sparsity=0.5), None, None, None, None)


# ---- registration from outside the package -------------------------------------------------
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=16, num_clients=3,
             clients_per_round=3, batch_size=8, rounds=1, progress=False, tensorboard=False,
             checkpoint_every=0)


def _one_round(cfg):
  exp = train.build_experiment(cfg)
  state, _ = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  return exp, jax.device_get(state.params)


def test_method_in_a_user_file_runs_through_build_experiment(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(TESTS)
  cfg = ExperimentConfig(**SMALL, algorithm="my_method:MyMethod", workdir=str(tmp_path))
  exp, params = _one_round(cfg)
  assert type(exp.algorithm).__name__ == "MyMethod" and exp.algorithm.bound
  _, ref = _one_round(cfg.replace(algorithm="fedavg"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, 0.5 * b), params, ref)


def test_register_algorithm_makes_a_name_runnable(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(TESTS)
  monkeypatch.setattr(algorithms, "_REGISTERED", {})   # no registration leaks to other tests
  import my_method
  algorithms.register_algorithm("scaled_avg", my_method.MyMethod)
  cfg = ExperimentConfig(**SMALL, algorithm="scaled_avg", workdir=str(tmp_path)).validate()
  assert isinstance(algorithms.get_algorithm(cfg.algorithm, cfg), my_method.MyMethod)
  assert "scaled_avg" in algorithms.names()
  with pytest.raises(ConfigError, match=r"name='fedavg' must be .* not a built-in"):
    algorithms.register_algorithm("fedavg", my_method.MyMethod)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:X", r"algorithm='no_such_module:X': cannot import 'no_such_module'"),
    ("my_method:Nope", r"module 'my_method' has no 'Nope'"),
    ("my_method:jax", r"is not a subclass of sparsefl_jax.algorithms.Algorithm"),
    ("fedfoo", r"algorithm='fedfoo' is not one of \['fedadam', 'fedavg'"),
])
def test_bad_algorithm_spec_is_one_config_error(spec, message, monkeypatch):
  monkeypatch.syspath_prepend(TESTS)
  with pytest.raises(ConfigError, match=message):
    ExperimentConfig(algorithm=spec).validate()


def _run_py(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_method_in_a_user_file_runs_through_run_py(tmp_path):
  flags = [f"--{k}={v}" for k, v in SMALL.items()]
  proc = _run_py("--algorithm=my_method:MyMethod", *flags, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "done: 1 rounds" in proc.stdout
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["algorithm"] == "my_method:MyMethod"
  bad = _run_py("--algorithm=my_method:Nope", *flags, f"--workdir={tmp_path}/bad")
  lines = [l for l in bad.stderr.splitlines() if l.strip()]
  assert bad.returncode == 2 and len(lines) == 1 and "has no 'Nope'" in lines[0], bad.stderr


# ---- capabilities ---------------------------------------------------------------------------
def test_capabilities_name_the_methods_the_old_lists_named():
  """The class attributes reproduce the name lists config.validate used to hard-code (plus
  the methods added since: SNIP, FedDST, GraSP, Random, update Top-K, OneShot, PruneFL and
  FLASH sparsify, unstructured only; FLASH reads --sparse_layers and binds its pruned layers
  in setup)."""
  assert set(algorithms.with_capability("sparse")) == {
      "swat", "zerofl", "fedsparsify_global", "fedsparsify_local", "sparsyfed", "topk",
      "snip", "feddst", "grasp", "random_prune", "topk_delta", "oneshot", "prunefl", "flash"}
  assert set(algorithms.with_capability("supports_block")) == {
      "swat", "zerofl", "topk", "sparsyfed", "fedsparsify_global", "fedsparsify_local"}
  assert set(algorithms.with_capability("supports_pallas")) == {"swat", "zerofl"}
  assert set(algorithms.with_capability("reads_sparse_layers")) == {"swat", "zerofl", "flash"}
  assert set(algorithms.with_capability("rounds_fixed_reason")) == {
      "fedsparsify_global", "fedsparsify_local", "random_prune", "oneshot"}
  assert set(algorithms.with_capability("needs_setup")) == {"swat", "zerofl", "sparsyfed",
                                                            "flash"}


def test_a_user_method_declares_its_capabilities(monkeypatch):
  monkeypatch.syspath_prepend(TESTS)
  with pytest.raises(ConfigError, match=r"sparsity_structure='block' is implemented for "):
    ExperimentConfig(algorithm="my_method:MyMethod", sparsity_structure="block").validate()


# ---- v2 hooks: round phases, local_update, init_from_data ---------------------------------
import dataclasses as _dc

from sparsefl_jax.algorithms.base import Phase
from sparsefl_jax.federated.probe import probe_batch


@_dc.dataclass(frozen=True)
class _Phased(FedAvg):
  """Rounds 1-2 ('warmup'): 2 clients for 3 local epochs, then the run's settings."""
  name = "phased"

  def round_phase(self, t):
    return "warmup" if t <= 2 else "train"

  def phase_settings(self, phase):
    return Phase(clients_per_round=2, local_epochs=3) if phase == "warmup" else Phase()


PHASED = dict(SMALL, num_clients=4, clients_per_round=4, rounds=4)


def test_round_phases_use_their_own_cohort_and_epochs_and_compile_once(tmp_path, monkeypatch):
  monkeypatch.setattr(algorithms, "_REGISTERED", {})
  algorithms.register_algorithm("phased", _Phased)
  cfg = ExperimentConfig(**PHASED, algorithm="phased", workdir=str(tmp_path))
  exp = train.build_experiment(cfg)
  state, sizes = exp.init_state, []
  for _ in range(5):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    sizes.append(len(m["clients"]))
  assert sizes == [2, 2, 4, 4, 4]
  assert sorted(exp.round_step._steps) == ["train", "warmup"]
  assert all(s._cache_size() == 1 for s in exp.round_step._steps.values())   # compiled once

  # Bit-identical to running the warmup as a FedAvg run of its own, then the run's FedAvg.
  warm = train.build_experiment(cfg.replace(algorithm="fedavg", clients_per_round=2,
                                            local_epochs=3))
  ref = warm.init_state
  for _ in range(2):
    ref, _ = warm.round_step(ref, warm.client_data, warm.train_key)
  plain = train.build_experiment(cfg.replace(algorithm="fedavg"))
  for _ in range(3):
    ref, _ = plain.round_step(ref, plain.client_data, plain.train_key)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(ref.params))


def test_round_phases_resume_bit_identically(tmp_path, monkeypatch):
  monkeypatch.setattr(algorithms, "_REGISTERED", {})
  algorithms.register_algorithm("phased", _Phased)
  cfg = ExperimentConfig(**dict(PHASED, checkpoint_every=1), algorithm="phased",
                         workdir=str(tmp_path / "a"))
  train.run(cfg)
  cut = cfg.replace(workdir=str(tmp_path / "b"))
  train.run(cut, max_rounds=1)                 # stopped inside the warmup phase
  train.run(cut.replace(resume=True))
  rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"}
           for l in open(os.path.join(c.workdir, "metrics.jsonl"))] for c in (cfg, cut)]
  assert rows[0] == rows[1] and [len(r["clients"]) for r in rows[0]] == [2, 2, 4, 4]


@_dc.dataclass(frozen=True)
class _StepSpy(FedAvg):
  """Records, per client, the local steps' round and index and the sum of |grad| it saw;
  halves the gradients of epoch 1 (a local_update that changes grads and client state)."""
  name = "step_spy"

  def client_init(self, global_params, algo_state, t, key):
    return (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

  def local_update(self, grads, params, opt_state, client_state, step):
    steps, last_round, gsum = client_state
    g = sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(grads))
    grads = jax.tree.map(lambda x: jnp.where(step.epoch == 1, 0.5 * x, x), grads)
    return grads, params, opt_state, (steps + 1, step.round, gsum + g)

  def client_metrics(self, global_params, upload, client_state):
    steps, last_round, gsum = client_state
    return {"spy_steps": steps.astype(jnp.float32), "spy_round": last_round.astype(
        jnp.float32), "spy_gsum": gsum}


def _round_of(algorithm, exp, epochs, client_map="vmap"):
  from sparsefl_jax.data import preprocess
  from sparsefl_jax.federated import client as client_lib
  from sparsefl_jax.federated import round as round_lib
  from sparsefl_jax.federated.optimizers import ClientLRSchedule
  local = client_lib.LocalConfig(epochs, exp.config.batch_size, exp.dataset.max_examples)
  rcfg = round_lib.RoundConfig(num_clients=3, clients_per_round=3, local=local,
                               lr_schedule=ClientLRSchedule(exp.config.lr),
                               client_map=client_map)
  return round_lib.jit_round_step(round_lib.build_round_step(
      algorithm, exp.model, preprocess.make_batch_fn(exp.dataset), rcfg, None), donate=False)


def test_local_update_sees_grads_step_and_round_and_changes_training(tmp_path):
  exp = train.build_experiment(ExperimentConfig(**SMALL, workdir=str(tmp_path)))
  step = _round_of(_StepSpy().bind(), exp, epochs=2)
  state = exp.init_state
  for t in (1, 2):
    state, metrics = step(state, exp.client_data, exp.train_key)
    assert float(metrics["spy_round"]) == t
  # Every client has 16 examples, batch 8: 2 batches x 2 epochs = 4 real steps each.
  assert float(metrics["spy_steps"]) == 4.0 and float(metrics["spy_gsum"]) > 0
  got, _ = step(exp.init_state, exp.client_data, exp.train_key)
  ref, _ = _round_of(FedAvg().bind(), exp, epochs=2)(exp.init_state, exp.client_data,
                                                      exp.train_key)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(jax.device_get(got.params)), jax.tree.leaves(jax.device_get(ref.params))))
  assert diff > 1e-4   # the halved epoch-1 gradients changed training


@_dc.dataclass(frozen=True)
class _ZeroSmallestGrad(FedAvg):
  """init_from_data: zero the half of the largest kernel with the smallest |grad| (a toy
  SNIP)."""
  name = "zero_small_grad"

  def init_from_data(self, params, algo_state, loss_fn, key):
    g = jax.tree.leaves(jax.grad(loss_fn)(params))[_largest(params)]
    flat, tree = jax.tree.flatten(params)
    i = _largest(params)
    flat[i] = jnp.where(jnp.abs(g) > jnp.median(jnp.abs(g)), flat[i], 0)
    return jax.tree.unflatten(tree, flat), algo_state


def _largest(tree):
  return int(np.argmax([np.size(x) for x in jax.tree.leaves(tree)]))


def test_init_from_data_gets_the_loss_on_one_drawn_client_batch(tmp_path, monkeypatch):
  monkeypatch.setattr(algorithms, "_REGISTERED", {})
  algorithms.register_algorithm("zero_small_grad", _ZeroSmallestGrad)
  cfg = ExperimentConfig(**SMALL, algorithm="zero_small_grad", workdir=str(tmp_path))
  exp = train.build_experiment(cfg)
  base = train.build_experiment(cfg.replace(algorithm="fedavg"))
  i = _largest(base.init_state.params)
  got = jax.tree.leaves(jax.device_get(exp.init_state.params))[i]
  params0 = jax.device_get(base.init_state.params)
  # Independent reference: the same client's batch (drawn from the init stream), the loss
  # written out here, numpy median threshold.
  from sparsefl_jax.data import preprocess
  init_key = jax.random.fold_in(jax.random.PRNGKey(cfg.init_seed), train.INIT_STREAM)
  key = jax.random.fold_in(init_key, train.DATA_INIT_TAG)
  batch_key, dropout_key, _ = jax.random.split(key, 3)
  _, x, y, w = probe_batch(base.client_data, cfg.batch_size, batch_key)
  x = preprocess.make_batch_fn(base.dataset)(x, batch_key, False)

  def loss(p):
    logits = base.model.apply({"params": p, **base.init_state.model_state}, x, train=True,
                              example_mask=w > 0, rngs={"dropout": dropout_key},
                              mutable=list(base.init_state.model_state))[0]
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], 1)[:, 0] * w) / jnp.sum(w)

  g = np.abs(np.asarray(jax.tree.leaves(jax.grad(loss)(base.init_state.params))[i]))
  first = np.asarray(jax.tree.leaves(params0)[i])
  np.testing.assert_allclose(got, np.where(g > np.median(g), first, 0), atol=1e-6)
  assert 0.4 < np.mean(got == 0) < 0.6


@_dc.dataclass(frozen=True)
class _ScoreUpload(FedAvg):
  """Uploads |w| of every kernel as extras (like PruneFL's importance scores) and keeps the
  server-side sum of the scores' example-weighted mean as its aggregate (a stats test)."""
  name = "score_upload"

  def client_upload(self, global_params, local_params, client_state, t):
    up = super().client_upload(global_params, local_params, client_state, t)
    return up._replace(extras=jax.tree.map(jnp.abs, local_params))

  def upload_stats(self, upload):
    return (upload.values, upload.extras), ()

  def finalize_aggregate(self, global_params, mean, counts, num_clients, algo_state, t):
    values, scores = mean
    return jax.tree.map(lambda v, s: v + 0.0 * s, values, scores)


def test_upload_extras_are_charged_and_reach_the_aggregate(tmp_path):
  exp = train.build_experiment(ExperimentConfig(**SMALL, workdir=str(tmp_path)))
  ref, plain = _round_of(FedAvg().bind(), exp, epochs=1)(exp.init_state, exp.client_data,
                                                         exp.train_key)
  assert not jax.tree.leaves(exp.init_state.model_state)   # no BN: bytes = the values'
  for client_map in ("vmap", "map"):   # stacked and streamed aggregate
    state, got = _round_of(_ScoreUpload().bind(), exp, 1, client_map)(
        exp.init_state, exp.client_data, exp.train_key)
    # Dense |w| scores cost exactly what the (dense) values cost: the bytes double.
    np.testing.assert_array_equal(np.asarray(got["uplink_bytes_per_client"]),
                                  2 * np.asarray(plain["uplink_bytes_per_client"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.device_get(state.params), jax.device_get(ref.params))

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
    ("fedfoo", r"algorithm='fedfoo' is not one of \['fedavg'"),
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
  """The class attributes reproduce the name lists config.validate used to hard-code."""
  assert set(algorithms.with_capability("sparse")) == {
      "swat", "zerofl", "fedsparsify_global", "fedsparsify_local", "sparsyfed", "topk"}
  assert set(algorithms.with_capability("supports_block")) == {
      "swat", "zerofl", "topk", "sparsyfed", "fedsparsify_global", "fedsparsify_local"}
  assert set(algorithms.with_capability("supports_pallas")) == {"swat", "zerofl"}
  assert set(algorithms.with_capability("reads_sparse_layers")) == {"swat", "zerofl"}
  assert set(algorithms.with_capability("rounds_fixed_reason")) == {
      "fedsparsify_global", "fedsparsify_local"}
  assert set(algorithms.with_capability("needs_setup")) == {"swat", "zerofl", "sparsyfed"}


def test_a_user_method_declares_its_capabilities(monkeypatch):
  monkeypatch.syspath_prepend(TESTS)
  with pytest.raises(ConfigError, match=r"sparsity_structure='block' is implemented for "):
    ExperimentConfig(algorithm="my_method:MyMethod", sparsity_structure="block").validate()

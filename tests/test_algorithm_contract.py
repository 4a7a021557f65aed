"""The algorithm contract v2: binding that cannot be skipped, capabilities, registration."""
import jax.numpy as jnp
import pytest

from sparsefl_jax.algorithms.base import UnboundAlgorithmError
from sparsefl_jax.algorithms.fedavg import FedAvg
from sparsefl_jax.algorithms.sparsyfed import SparsyFed
from sparsefl_jax.algorithms.zerofl import SwatFL, ZeroFL

PARAMS = {"fc1": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros((8,))},
          "fc2": {"kernel": jnp.ones((8, 3)), "bias": jnp.zeros((3,))}}


@pytest.mark.parametrize("algo", [ZeroFL(sparsity=0.5), SwatFL(sparsity=0.5)])
def test_unbound_zerofl_refuses_instead_of_guessing_layers_by_name(algo):
  with pytest.raises(UnboundAlgorithmError, match=r"setup\(\)"):
    algo.densities(PARAMS)
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

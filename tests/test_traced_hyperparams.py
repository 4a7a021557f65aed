"""Method hyperparameters as traced values: a sweep vmaps whole rounds over them.

For each traceable hyperparameter, `jax.vmap` over a few values of a function that builds the
algorithm (and the RoundConfig, for the learning rate) from the traced value and runs two
rounds must give, slice by slice, the runs with each value as a Python number; and the values
must change the result. Concrete out-of-range values still raise their one-line errors; a
traced value where a number is needed raises a one-line TracedValueError.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import models, traceable
from sparsefl_jax.algorithms import FedAvg, FedProx
from sparsefl_jax.algorithms.fedsparsify import FedSparsifyGlobal, FedSparsifyLocal
from sparsefl_jax.algorithms.sparsyfed import SparsyFed
from sparsefl_jax.algorithms.topk import TopK
from sparsefl_jax.algorithms.zerofl import SwatFL, ZeroFL
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated.optimizers import ClientLRSchedule
from sparsefl_jax.federated.round import RoundConfig, build_round_step, init_server_state
from sparsefl_jax.federated.state import ClientData
from sparsefl_jax.models import introspect
from sparsefl_jax.sparsity import PolynomialSchedule, swat

P, M, D, C = 5, 12, 6, 3   # clients, examples per client, features, classes
ROUNDS = 2
MODEL = models.get_model("mlp_small", C)
X0 = jnp.zeros((1, D))
PARAMS0 = MODEL.init(jax.random.PRNGKey(1), X0)["params"]
ORDER = introspect.weight_layer_order(MODEL, {"params": PARAMS0}, X0)


def make_data() -> ClientData:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(P, M, D)).astype(np.float32)
  y = rng.integers(0, C, size=(P, M)).astype(np.int32)
  return ClientData.from_arrays(x, y, np.asarray([12, 9, 12, 7, 10], np.int32))


DATA = make_data()


def batch_fn(x, key, train):
  del key, train
  return x.astype(jnp.float32)


def round_cfg(lr_schedule=None) -> RoundConfig:
  return RoundConfig(num_clients=P, clients_per_round=3,
                     local=client_lib.LocalConfig(1, 4, M),
                     lr_schedule=lr_schedule or ClientLRSchedule(0.1), momentum=0.5,
                     comm_encoding="dense")


def run(algorithm, cfg=None):
  """Set-up (init_params, setup, the layer op) and ROUNDS rounds; returns (params, metrics).

  Plain JAX throughout, so it runs as is for a concrete value and under jax.vmap for a
  traced one.
  """
  params = algorithm.init_params(PARAMS0, jax.random.PRNGKey(2))
  algorithm, op = algorithm.setup(params, ORDER)
  model = MODEL if op is None else models.get_model("mlp_small", C, op=op)
  state = init_server_state(algorithm, params, {}, None, jax.random.PRNGKey(7))
  step = jax.jit(build_round_step(algorithm, model, batch_fn, cfg or round_cfg(), None))
  for _ in range(ROUNDS):
    state, metrics = step(state, DATA, jax.random.PRNGKey(3))
  return state.params, {k: metrics[k] for k in ("train_loss", "uplink_nnz_per_client",
                                                "global_density")}


def check_sweep(build, values, tol=1e-5):
  """vmap over `values` == the concrete runs, slice by slice; and the values matter.

  `build(*hyperparameters)` returns (algorithm, RoundConfig or None); each entry of `values`
  is a number or a tuple of numbers (several hyperparameters traced together).
  """
  rows = [v if isinstance(v, tuple) else (v,) for v in values]
  columns = tuple(jnp.asarray(c, jnp.float32) for c in zip(*rows))
  swept = jax.vmap(lambda *hp: run(*build(*hp)))(*columns)
  singles = [run(*build(*row)) for row in rows]   # Python floats: the concrete path
  for i, single in enumerate(singles):
    got = jax.tree.map(lambda a: np.asarray(a)[i], swept)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree.leaves(single)):
      np.testing.assert_allclose(a, np.asarray(b), rtol=tol, atol=tol,
                                 err_msg=f"value {rows[i]}: {jax.tree_util.keystr(path)}")
  params = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(s[0])]) for s in singles]
  for i in range(1, len(params)):
    assert np.max(np.abs(params[i] - params[0])) > 1e-3, f"{rows[i]} vs {rows[0]}: no effect"
  return singles


# ---- traced hyperparameters: vmapped rounds == concrete rounds --------------------------
def test_fedprox_mu():
  check_sweep(lambda mu: (FedProx(mu=mu), None), [0.0, 0.5, 3.0])


def test_client_lr_constant():
  check_sweep(lambda lr: (FedAvg(), round_cfg(ClientLRSchedule(lr))), [0.02, 0.1, 0.4])


def test_client_lr_exponential_lr_and_lr_end():
  def build(lr, lr_end):
    return FedAvg(), round_cfg(ClientLRSchedule(lr, "exponential", lr_end, ROUNDS))
  check_sweep(build, [(0.3, 0.01), (0.3, 0.2), (0.05, 0.01)])


def test_sparsyfed_beta():
  check_sweep(lambda beta: (SparsyFed(sparsity=0.5, beta=beta), None), [1.0, 1.25, 1.75])


@pytest.mark.parametrize("method", ["bisection", "sort"])
def test_sparsyfed_and_topk_sparsity(method):
  check_sweep(lambda s: (TopK(sparsity=s, method=method), None), [0.2, 0.5, 0.8])
  if method == "bisection":
    check_sweep(lambda s: (SparsyFed(sparsity=s, beta=1.25), None), [0.2, 0.7])


@pytest.mark.parametrize("cls", [FedSparsifyGlobal, FedSparsifyLocal])
def test_fedsparsify_final_sparsity(cls):
  def build(s_final):
    return cls(schedule=PolynomialSchedule(s_final, ROUNDS, start_round=0)), None
  singles = check_sweep(build, [0.3, 0.6, 0.9])
  densities = [float(m["global_density"]) for _, m in singles]
  assert densities[0] > densities[1] > densities[2]   # s_T really reached the pruning


@pytest.mark.parametrize("strategy", ["topk_weights", "topk_weights_diff"])
def test_zerofl_mask_ratio(strategy):
  def build(ratio):
    return ZeroFL(sparsity=0.7, mask_ratio=ratio, strategy=strategy, sparse_layers="all"), None
  singles = check_sweep(build, [0.0, 0.2, 0.5])
  nnz = [int(np.sum(m["uplink_nnz_per_client"])) for _, m in singles]
  assert nnz[0] < nnz[1] < nnz[2]   # the upload density follows 1 − sp + r_mask


def test_swat_and_zerofl_sparsity():
  check_sweep(lambda s: (SwatFL(sparsity=s, sparse_layers="all", topk_period=2), None),
              [0.3, 0.6, 0.9])
  check_sweep(lambda s, r: (ZeroFL(sparsity=s, mask_ratio=r), None), [(0.5, 0.1), (0.8, 0.3)])


# ---- errors --------------------------------------------------------------------------------
def _check_one_line(excinfo, pattern: str) -> None:
  """The error's own message (without the note JAX appends under a transformation) is one
  line matching `pattern`."""
  message = str(excinfo.value).split("\n" + "-" * 20)[0]
  assert "\n" not in message, message
  assert re.search(pattern, message), message


@pytest.mark.parametrize("make, match", [
    (lambda: FedProx(mu=-0.1), r"^prox_mu=-0\.1 must be >= 0$"),
    (lambda: FedProx(mu=float("nan")), r"^prox_mu=nan must be >= 0$"),
    (lambda: ClientLRSchedule(0.0), r"^lr=0\.0 must be > 0$"),
    (lambda: ClientLRSchedule(0.1, "exponential", None),
     r"^lr_end=None must be > 0 for the exponential schedule$"),
    (lambda: ClientLRSchedule(0.1, "exponential", -1.0), r"^lr_end=-1\.0 must be > 0"),
    (lambda: SparsyFed(beta=0.9), r"^beta=0\.9 must be >= 1$"),
    (lambda: TopK(sparsity=1.0), r"^sparsity=1\.0 must lie in \[0, 1\)$"),
    (lambda: ZeroFL(sparsity=0.3, mask_ratio=0.5), r"^mask_ratio=0\.5 must lie in \[0, "
                                                    r"sparsity=0\.3\]$"),
    (lambda: ZeroFL(sparsity=-0.2), r"^sparsity=-0\.2 must lie in \[0, 1\)$"),
    (lambda: PolynomialSchedule(1.0, 10), r"^final_sparsity must be a number in \[0, 1\)"),
    (lambda: swat.layer_densities(PARAMS0, 1.2), r"^sparsity=1\.2 must lie in \[0, 1\)$"),
])
def test_concrete_out_of_range_values_still_raise(make, match):
  with pytest.raises(ValueError) as excinfo:
    make()
  _check_one_line(excinfo, match)


def _under_vmap(make, value=0.5):
  """Calls make(traced scalar) inside jax.vmap (as a sweep would)."""
  def f(v):
    make(v)
    return v
  return jax.vmap(f)(jnp.full((2,), value, jnp.float32))


@pytest.mark.parametrize("make, match", [
    (lambda s: TopK(sparsity=s, method="top_k"),
     r"^sparsity is traced .*topk_method='top_k' .* use topk_method='bisection' or 'sort'$"),
    (lambda s: ZeroFL(sparsity=0.7, mask_ratio=s * 0.1, method="top_k"),
     r"^mask_ratio is traced .*topk_method='top_k'"),
    (lambda s: SwatFL(sparsity=s, distribution="erk"),
     r"^sparsity is traced .*sparsity_distribution='erk'.*use sparsity_distribution="
     r"'uniform'$"),
    (lambda s: SwatFL(sparsity=s, structure="block"),
     r"^sparsity is traced .*sparsity_structure='block'"),
    (lambda s: swat.layer_densities(PARAMS0, s, "all", "erk", ORDER),
     r"^sparsity is traced .*sparsity_distribution='erk'"),
])
def test_traced_value_where_a_number_is_needed(make, match):
  with pytest.raises(traceable.TracedValueError) as excinfo:
    _under_vmap(make)
  _check_one_line(excinfo, match)


def test_traced_values_skip_the_range_check_but_must_be_scalars():
  # A traced value is not range-checked (its value is unknown)...
  _under_vmap(lambda mu: FedProx(mu=mu), value=-1.0)
  # ...but it must be one scalar per sweep point.
  with pytest.raises(ValueError) as excinfo:
    jax.vmap(lambda mu: FedProx(mu=mu).mu)(jnp.ones((2, 3)))
  _check_one_line(excinfo, r"^prox_mu must be a scalar, got a traced value of shape \(3,\)$")


def test_is_traced_and_require_concrete():
  assert not traceable.is_traced(0.5, np.float32(0.5), jnp.float32(0.5), None)
  seen = []
  jax.vmap(lambda v: seen.append(traceable.is_traced(1.0, {"a": v})) or v)(jnp.ones(2))
  assert seen == [True]
  assert traceable.require_concrete("x", 0.25, "here") == 0.25

"""Server FedOpt (Reddi et al. 2021, Algorithm 2) against a plain numpy reference, alone and
inside the jitted round; the optax form stays selectable."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.algorithms import FedAdam, FedAvg
from sparsefl_jax.config import ConfigError
from sparsefl_jax.federated.fedopt import FedOptState
from sparsefl_jax.federated.optimizers import server_optimizer

from test_engine import make_data, make_round

KINDS = ("adam", "yogi", "adagrad")
LR, B1, B2, TAU = 0.05, 0.9, 0.99, 1e-3


class NumpyFedOpt:
  """Reddi et al.'s server step written out: Δ = aggregate − w, m0 = v0 = 0, no bias
  correction, w ← w + η·m/(√v + τ)."""

  def __init__(self, kind, w):
    self.kind, self.w = kind, np.asarray(w, np.float64)
    self.m, self.v = np.zeros_like(self.w), np.zeros_like(self.w)

  def step(self, aggregate):
    d = np.asarray(aggregate, np.float64) - self.w
    self.m = B1 * self.m + (1 - B1) * d
    if self.kind == "adam":
      self.v = B2 * self.v + (1 - B2) * d * d
    elif self.kind == "yogi":
      self.v = self.v - (1 - B2) * d * d * np.sign(self.v - d * d)
    else:
      self.v = self.v + d * d
    self.w = self.w + LR * self.m / (np.sqrt(self.v) + TAU)
    return self.w


def deltas(seed=0):
  """Three rounds of aggregate displacements around τ in size (where bias correction
  matters); round 2 mixes smaller and larger entries, so Yogi takes both signs."""
  rng = np.random.default_rng(seed)
  d1 = rng.normal(size=(4, 5)) * 1e-3
  d2 = d1 * np.where(rng.random((4, 5)) < 0.5, 0.03, 5.0)
  d3 = rng.normal(size=(4, 5)) * 2e-3
  return [d.astype(np.float32) for d in (d1, d2, d3)]


@pytest.mark.parametrize("kind", KINDS)
def test_reddi_transformation_matches_numpy_over_three_rounds(kind):
  opt = server_optimizer(kind, LR, b1=B1, b2=B2, eps=TAU)     # the default impl
  w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)
  params, state = {"k": w}, opt.init({"k": w})
  ref = NumpyFedOpt(kind, w)
  for d in deltas():
    aggregate = params["k"] + d
    pseudo = {"k": params["k"] - aggregate}                  # the engine's sign: w − aggregate
    updates, state = opt.update(pseudo, state, params)
    params = optax.apply_updates(params, updates)
    want = ref.step(aggregate)
    np.testing.assert_allclose(params["k"], want, rtol=1e-5, atol=1e-7)


def test_optax_adam_differs_from_reddi_where_delta_is_near_tau():
  """The reason for the Reddi form: optax's bias correction (τ_eff = τ·√(1−β2^t)) moves
  coordinates with |Δ| ≈ τ several times further in round 1."""
  w = {"k": jnp.zeros((4, 5), jnp.float32)}
  g = {"k": -jnp.asarray(deltas()[0])}
  steps = {}
  for impl in ("reddi", "optax"):
    opt = server_optimizer("adam", LR, b1=B1, b2=B2, eps=TAU, impl=impl)
    steps[impl] = np.abs(np.asarray(opt.update(g, opt.init(w), w)[0]["k"]))
  # Round 1 with x = |Δ|/τ: Reddi moves η·x/(x + 10), optax η·x/(x + 1).
  x = np.abs(deltas()[0]) / TAU
  np.testing.assert_allclose(steps["optax"] / steps["reddi"], (x + 10) / (x + 1), rtol=1e-4)
  assert np.max(steps["optax"] / steps["reddi"]) > 3.0


@pytest.mark.parametrize("kind", KINDS)
def test_round_with_reddi_server_matches_numpy_over_three_rounds(kind):
  """Inside the jitted round: the FedAvg aggregate from the same global model, then the
  numpy server step; three rounds, so m and v carry over."""
  data = make_data()
  key = jax.random.PRNGKey(5)
  step_opt, s, _ = make_round(FedAdam(), server=server_optimizer(kind, LR, b1=B1, b2=B2,
                                                                 eps=TAU))
  step_avg, state_avg, _ = make_round(FedAvg())
  refs = {name: NumpyFedOpt(kind, leaf) for name, leaf in s.params["fc"].items()}
  for _ in range(3):
    probe = state_avg._replace(params=s.params, round=s.round)
    aggregate = step_avg(probe, data, key)[0].params["fc"]
    for name, ref in refs.items():      # the reference follows the engine's params
      ref.w = np.asarray(s.params["fc"][name], np.float64)
      ref.step(aggregate[name])
    s, _ = step_opt(s, data, key)
    for name, ref in refs.items():
      np.testing.assert_allclose(s.params["fc"][name], ref.w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, optax_fn", [("adam", optax.adam), ("yogi", optax.yogi)])
def test_optax_impl_is_optax(kind, optax_fn):
  w = {"k": jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)}
  ours = server_optimizer(kind, LR, b1=B1, b2=B2, eps=TAU, impl="optax")
  theirs = optax_fn(LR, b1=B1, b2=B2, eps=TAU)
  s1, s2 = ours.init(w), theirs.init(w)
  for d in deltas():
    g = {"k": -jnp.asarray(d)}
    u1, s1 = ours.update(g, s1, w)
    u2, s2 = theirs.update(g, s2, w)
    chex.assert_trees_all_close(u1, u2, rtol=0, atol=0)


def test_config_selects_the_server_optimizer_form():
  base = dict(algorithm="fedadam", dataset="synthetic", model="linear",
              synthetic_shape="4,4,1", synthetic_examples=8, synthetic_test=8, num_clients=2,
              clients_per_round=2, rounds=1, progress=False, workdir="/tmp/unused")
  exp = train.build_experiment(ExperimentConfig(**base))
  assert isinstance(exp.init_state.opt_state, FedOptState)
  exp = train.build_experiment(ExperimentConfig(**base, server_opt_impl="optax"))
  assert not isinstance(exp.init_state.opt_state, FedOptState)
  with pytest.raises(ConfigError, match="server_opt_impl='flower'"):
    ExperimentConfig(**base, server_opt_impl="flower").validate()

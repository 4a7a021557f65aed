"""GraSP: Hg against a numpy finite-difference Hessian and jax.hessian, the signed top (1 − s)
against numpy, the probe's temperature, one-line errors, and runs through the library and
run.py."""
import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sparsefl_jax import train
from sparsefl_jax.algorithms.grasp import GraSP, hessian_gradient_product, kernel_tangent
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.federated import probe
from sparsefl_jax.federated.probe import probe_batch
from sparsefl_jax.federated.state import ClientData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
B = 7
X = RNG.normal(size=(B, 6))
Y = RNG.integers(0, 3, B)
PARAMS64 = {"Dense_0": {"kernel": RNG.normal(size=(6, 5)), "bias": RNG.normal(size=(5,))},
            "Dense_1": {"kernel": RNG.normal(size=(5, 3)), "bias": 0.1 * RNG.normal(size=(3,))},
            "bn": {"scale": 1.0 + 0.1 * RNG.normal(size=(5,)), "bias": 0.1 * RNG.normal(size=(5,))}}
PARAMS = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), PARAMS64)
KERNELS = ("Dense_0", "Dense_1")


def jax_loss(p, temperature=1.0):
  """The tiny net in jax: tanh layer, a BN-like affine, softmax cross-entropy at T."""
  h = jnp.tanh(jnp.asarray(X, jnp.float32) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  h = h * p["bn"]["scale"] + p["bn"]["bias"]
  logits = (h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]) / temperature
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), Y])


def np_grad(p, temperature=1.0):
  """The same net's gradient written out by hand in float64 numpy (no autodiff)."""
  pre = X @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  a = np.tanh(pre)
  hb = a * p["bn"]["scale"] + p["bn"]["bias"]
  z = (hb @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]) / temperature
  prob = np.exp(z - z.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  dz = (prob - np.eye(3)[Y]) / B / temperature
  dhb = dz @ p["Dense_1"]["kernel"].T
  dpre = dhb * p["bn"]["scale"] * (1 - a ** 2)
  return {"Dense_0": {"kernel": X.T @ dpre, "bias": dpre.sum(0)},
          "Dense_1": {"kernel": hb.T @ dz, "bias": dz.sum(0)},
          "bn": {"scale": (dhb * a).sum(0), "bias": dhb.sum(0)}}


def np_hg(p, temperature=1.0, eps=1e-6):
  """H·g_kernels by central differences of the numpy gradient along g restricted to the
  kernels (float64: error ~eps²)."""
  g = np_grad(p, temperature)
  v = {k: {n: (g[k][n] if (n == "kernel") else np.zeros_like(g[k][n])) for n in g[k]}
       for k in g}
  plus = np_grad(jax.tree.map(lambda a, d: a + eps * d, p, v), temperature)
  minus = np_grad(jax.tree.map(lambda a, d: a - eps * d, p, v), temperature)
  return jax.tree.map(lambda a, b: (a - b) / (2 * eps), plus, minus)


def np_keep_top(scores: dict, density: float, magnitude: bool = False) -> dict:
  """Keep the ceil(density·N) largest scores over all the given arrays (ties kept)."""
  flat = np.concatenate([s.ravel() for s in scores.values()])
  flat = np.abs(flat) if magnitude else flat
  k = int(np.ceil(density * flat.size - 1e-9))
  thr = np.sort(flat)[::-1][k - 1]
  return {n: ((np.abs(s) if magnitude else s) >= thr) for n, s in scores.items()}


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_hg_matches_finite_differences_of_a_numpy_gradient_and_jax_hessian(temperature):
  # The numpy gradient is right (checked against jax.grad), then Hg against its central
  # differences (independent of autodiff) and against the full jax.hessian matrix.
  algo = GraSP(sparsity=0.5, temperature=temperature)
  flat, unravel = ravel_pytree(PARAMS)

  @jax.jit
  def compute():   # one program: eager ops would compile one by one
    g = jax.grad(jax_loss)(PARAMS, temperature)
    hess = jax.hessian(lambda f: jax_loss(unravel(f), temperature))(flat)
    return (g, hessian_gradient_product(algo.scored_loss(jax_loss), PARAMS), hess,
            ravel_pytree(kernel_tangent(g))[0], ravel_pytree(g)[0],
            algo.scores(PARAMS, jax_loss))

  g, got, hess, g_k, g_full, scores = jax.device_get(compute())
  chex.assert_trees_all_close(g, jax.tree.map(np.float32, np_grad(PARAMS64, temperature)),
                              rtol=1e-5, atol=1e-6)
  want = np_hg(PARAMS64, temperature)
  scale = max(np.abs(x).max() for x in jax.tree.leaves(want))
  chex.assert_trees_all_close(got, jax.tree.map(np.float32, want), rtol=1e-4,
                              atol=1e-5 * scale)
  np.testing.assert_allclose(ravel_pytree(got)[0], hess @ g_k, rtol=1e-4, atol=1e-6 * scale)
  # The tangent is g on the kernels only: Hg differs from the full H·g.
  assert not np.allclose(hess @ g_k, hess @ g_full, rtol=1e-3)
  # Scores: θ ⊙ Hg on the kernels, 0 elsewhere.
  for layer in KERNELS:
    np.testing.assert_allclose(scores[layer]["kernel"],
                               PARAMS64[layer]["kernel"] * want[layer]["kernel"],
                               rtol=1e-4, atol=1e-5 * scale)
    assert not np.asarray(scores[layer]["bias"]).any()


@pytest.mark.parametrize("score,sparsity", [("signed", 0.7), ("signed", 0.4),
                                            ("magnitude", 0.7)])
def test_mask_keeps_the_top_of_the_signed_score_like_numpy(score, sparsity):
  algo = GraSP(sparsity=sparsity, score=score)
  got_params, state, all_scores = jax.device_get(jax.jit(lambda p: (
      *algo.init_from_data(p, algo.init_state(p), jax_loss, None),
      algo.scores(p, jax_loss)))(PARAMS))
  scores = {l: np.asarray(all_scores[l]["kernel"]) for l in KERNELS}
  keep = np_keep_top(scores, 1 - sparsity, magnitude=score == "magnitude")
  for l in KERNELS:
    np.testing.assert_array_equal(np.asarray(state.mask[l]["kernel"]), keep[l])
    np.testing.assert_array_equal(np.asarray(got_params[l]["kernel"]),
                                  np.where(keep[l], PARAMS[l]["kernel"], 0.0))
    assert np.asarray(state.mask[l]["bias"]).all()
  assert all(np.asarray(m).all() for m in state.mask["bn"].values())
  assert sum(k.sum() for k in keep.values()) == int(np.ceil((1 - sparsity) * 45))
  flat = np.concatenate([s.ravel() for s in scores.values()])
  kept = np.concatenate([np.asarray(state.mask[l]["kernel"]).ravel() for l in KERNELS])
  if score == "signed":
    # The sign matters: every kept score is >= every pruned one, and some pruned entry has a
    # larger |score| than some kept one (a large negative θ·Hg is removed first).
    assert flat[kept].min() >= flat[~kept].max()
    assert np.abs(flat[~kept]).max() > np.abs(flat[kept]).min()


def test_signed_and_magnitude_masks_differ():
  masks = [jax.jit(lambda p, s=s: GraSP(sparsity=0.7, score=s).init_from_data(
      p, GraSP().init_state(p), jax_loss, None)[1].mask)(PARAMS)
           for s in ("signed", "magnitude")]
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks[0]),
                                                     jax.tree.leaves(masks[1])))


class _BNNet(nn.Module):
  """Dense → BatchNorm (batch statistics in training) → tanh → Dense: a small BN model."""

  @nn.compact
  def __call__(self, x, train=False, example_mask=None):
    del example_mask
    x = nn.Dense(6)(x.reshape((x.shape[0], -1)))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(jnp.tanh(x))


def test_probe_temperature_scores_the_logits_over_t_on_a_batchnorm_model():
  # Through the engine's probe on a flax BatchNorm model, T = 200: the mask equals the numpy
  # top of θ ⊙ (H g_k) with H from jax.hessian of a loss written here with logits / 200.
  model = _BNNet()
  rng = np.random.default_rng(1)
  data = ClientData.from_arrays(rng.normal(size=(3, 10, 5)).astype(np.float32),
                                rng.integers(0, 3, (3, 10)), np.array([10, 9, 10]))
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 5))))(jax.random.PRNGKey(0))
  params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
  key = jax.random.PRNGKey(3)

  def run(temperature):
    algo = GraSP(sparsity=0.75, temperature=temperature)
    return probe.run_init_from_data(algo, model, lambda x, k, t: x, data, params, model_state,
                                    algo.init_state(params), 8, key)[1].mask

  mask = run(200.0)
  _, x, y, w = jax.jit(probe_batch, static_argnums=1)(data, 8, jax.random.split(key, 3)[0])
  assert np.asarray(w).all()                    # every client holds >= 8: no padding rows

  def loss(p):
    logits, _ = model.apply({"params": p, **model_state}, x, train=True,
                            mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits / 200.0)[jnp.arange(8), y])

  flat, unravel = ravel_pytree(params)

  @jax.jit
  def reference():   # one program: eager ops would compile one by one
    hess = jax.hessian(lambda f: loss(unravel(f)))(flat)
    return hess, ravel_pytree(kernel_tangent(jax.grad(loss)(params)))[0]

  hess, g_k = (np.asarray(a, np.float64) for a in reference())
  hg = unravel(jnp.asarray(hess @ g_k, jnp.float32))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           if p[-1].key == "kernel"]

  def at(tree, path):
    for k in path:
      tree = tree[k.key]
    return np.asarray(tree)

  scores = {jax.tree_util.keystr(p): at(params, p).astype(np.float64) * at(hg, p)
            for p in paths}
  keep = np_keep_top(scores, 0.25)
  thr = np.sort(np.concatenate([s.ravel() for s in scores.values()]))[::-1][
      int(np.ceil(0.25 * sum(s.size for s in scores.values()))) - 1]
  scale = max(np.abs(s).max() for s in scores.values())
  for p in paths:
    got, want, s = at(mask, p), keep[jax.tree_util.keystr(p)], scores[jax.tree_util.keystr(p)]
    clear = np.abs(s - thr) > 1e-4 * scale        # rank decided beyond float32 noise
    np.testing.assert_array_equal(got[clear], want[clear])
  total = sum(s.size for s in scores.values())
  assert sum(at(mask, p).sum() for p in paths) == int(np.ceil(0.25 * total))
  for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if path[-1].key != "kernel":
      assert np.asarray(m).all(), path          # BN scale/bias and biases never pruned
  # The temperature changes the ranking (it is not ignored).
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mask),
                                                     jax.tree.leaves(run(1.0))))


@pytest.mark.parametrize("args,message", [
    ({"grasp_temperature": 0.0}, r"grasp_temperature=0.0 must lie in \(0, inf\)"),
    ({"grasp_temperature": float("inf")}, r"grasp_temperature=inf must lie in \(0, inf\)"),
    ({"grasp_score": "abs"}, r"grasp_score='abs' is not one of \['signed', 'magnitude'\]"),
])
def test_bad_hyperparameters_are_one_line(args, message, tmp_path):
  cfg = ExperimentConfig(algorithm="grasp", sparsity=0.9, method_args=args,
                         workdir=str(tmp_path))
  with pytest.raises(ConfigError, match=message) as e:
    cfg.validate()
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), r"grasp_temperature=-1.0 must lie in \(0, inf\)"),
    (dict(score="x"), r"grasp_score='x' is not one of"),
    (dict(sparsity=1.0), r"sparsity=1.0 must lie in \[0, 1\)"),
])
def test_bad_constructor_values_are_one_line(kwargs, message):
  with pytest.raises(ValueError, match=message):
    GraSP(**kwargs)


SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=16, num_clients=4,
             clients_per_round=2, batch_size=8, rounds=2, progress=False, tensorboard=False,
             checkpoint_every=0, algorithm="grasp", sparsity=0.8)


def test_mask_is_fixed_and_two_builds_are_bit_identical(tmp_path):
  cfg = ExperimentConfig(**SMALL, method_args={"grasp_temperature": 200.0},
                         workdir=str(tmp_path))
  finals = []
  for _ in range(2):
    exp = train.build_experiment(cfg)
    mask0 = jax.device_get(exp.init_state.algo_state.mask)
    kernels = [m for p, m in jax.tree_util.tree_flatten_with_path(mask0)[0]
               if p[-1].key == "kernel"]
    total = sum(m.size for m in kernels)
    assert sum(m.sum() for m in kernels) == int(np.ceil(0.2 * total))
    state = exp.init_state
    for _ in range(2):
      state, _ = exp.round_step(state, exp.client_data, exp.train_key)
      state_h = jax.device_get(state)
      jax.tree.map(np.testing.assert_array_equal, state_h.algo_state.mask, mask0)
      jax.tree.map(lambda w, m: np.testing.assert_array_equal(w[~m], 0), state_h.params,
                   mask0)
    finals.append(jax.device_get(state))
  chex.assert_trees_all_equal(finals[0].params, finals[1].params)
  chex.assert_trees_all_equal(finals[0].algo_state, finals[1].algo_state)


def test_launch_script_runs_it_with_its_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--algorithm=grasp",
       "--sparsity=0.8", "--grasp_temperature=200", "--grasp_score=magnitude",
       "--dataset=synthetic", "--model=mlp_small", "--synthetic_shape=8,8,1",
       "--synthetic_examples=16", "--synthetic_test=16", "--batch_size=8", "--num_clients=3",
       "--clients_per_round=2", "--rounds=2", "--noprogress", f"--workdir={tmp_path}"],
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["method_args"] == {"grasp_score": "magnitude", "grasp_temperature": 200.0}
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 2 and rows[0]["nnz_params"] == rows[1]["nnz_params"]

"""SNIP: connection sensitivity on one client's batch at initialisation, a fixed mask."""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import train
from sparsefl_jax.algorithms.snip import SNIP
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.data import preprocess
from sparsefl_jax.federated import probe
from sparsefl_jax.federated.probe import probe_batch
from sparsefl_jax.federated.state import ClientData
from sparsefl_jax.models import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(dataset="synthetic", model="small_cnn", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=16, num_clients=4,
             clients_per_round=2, batch_size=8, rounds=3, progress=False, tensorboard=False,
             checkpoint_every=0, algorithm="snip", sparsity=0.8)


def _kernels(tree):
  return {"/".join(str(k.key) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if p[-1].key == "kernel"}


def _numpy_topk_keep(scores: dict, density: float) -> dict:
  """Keep the ceil(density·N) largest scores over all kernels (ties at the threshold kept)."""
  flat = np.concatenate([s.ravel() for s in scores.values()])
  k = int(np.ceil(density * flat.size - 1e-9))
  thr = np.sort(flat)[::-1][k - 1]
  return {name: s >= thr for name, s in scores.items()}


def _tiny_problem(dead_input: bool = False):
  """A hand-written 2-layer net (plain jax, a BN-like affine in between) and its loss on one
  batch; `dead_input` zeroes input feature 0, so row 0 of Dense_0's kernel gets no gradient."""
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                        "bias": jnp.zeros((3,), jnp.float32)},
            "bn": {"scale": jnp.ones((5,)), "bias": jnp.zeros((5,))}}
  x = rng.normal(size=(7, 6))
  if dead_input:
    x[:, 0] = 0.0
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 7))

  def loss(p):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = h * p["bn"]["scale"] + p["bn"]["bias"]
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(7), y])

  return params, loss


def test_scores_and_mask_match_an_independent_jax_grad_and_numpy():
  params, loss = _tiny_problem()
  algo = SNIP(sparsity=0.7)
  got_params, state = algo.init_from_data(params, algo.init_state(params), loss, None)
  # Independent reference: the gradient of the hand-written loss by jax.grad, the scores and
  # the top-(1 - s) selection in numpy.
  g = jax.grad(loss)(params)
  want_scores = {n: np.abs(np.asarray(g[n.split("/")[0]]["kernel"]) * w)
                 for n, w in _kernels(params).items()}
  got_scores = _kernels(algo.scores(params, loss))
  for n in want_scores:
    np.testing.assert_allclose(got_scores[n], want_scores[n], rtol=1e-6)
  keep = _numpy_topk_keep(want_scores, 0.3)
  for n, m in _kernels(state.mask).items():
    np.testing.assert_array_equal(m, keep[n])
  kept = sum(m.sum() for m in keep.values())
  assert kept == int(np.ceil(0.3 * 45))       # 45 kernel entries; no ties in random data
  # Biases and BatchNorm are never pruned; pruned kernel entries are exactly 0.
  for leaf in ("bias",):
    assert np.asarray(state.mask["Dense_0"][leaf]).all()
  assert all(np.asarray(v).all() for v in state.mask["bn"].values())
  for n, w in _kernels(got_params).items():
    np.testing.assert_array_equal(w, np.where(keep[n], _kernels(params)[n], 0.0))


@pytest.mark.parametrize("sparsity,kept", [(0.2, 36), (0.05, 45)])
def test_ties_at_the_threshold_are_kept(sparsity, kept):
  # Input feature 0 is 0 on the batch: the 5 entries of Dense_0's kernel row 0 score exactly
  # 0, the 40 others are positive. At s = 0.2 the threshold (36th largest of 45) is positive:
  # exactly 36 kept and every zero score pruned. At s = 0.05 it is 0, tied 5 ways, and ties
  # are kept (`topk`: mask = score >= k-th largest), so all 45 stay (density 1 > 1 - s).
  params, loss = _tiny_problem(dead_input=True)
  algo = SNIP(sparsity=sparsity)
  scores = _kernels(algo.scores(params, loss))
  assert (scores["Dense_0/kernel"][0] == 0).all()
  assert (np.concatenate([scores["Dense_0/kernel"][1:].ravel(),
                          scores["Dense_1/kernel"].ravel()]) > 0).all()
  mask = _kernels(algo.init_from_data(params, algo.init_state(params), loss, None)[1].mask)
  assert sum(m.sum() for m in mask.values()) == kept
  assert mask["Dense_0/kernel"][0].all() == (kept == 45)
  keep = _numpy_topk_keep(scores, 1 - sparsity)
  for n, m in mask.items():
    np.testing.assert_array_equal(m, keep[n])


def test_batchnorm_model_scores_kernels_only_through_the_probe():
  # A real flax BatchNorm model (a 1-block ResNet) through the engine's probe: BN scale/bias
  # are never masked, the BN statistics (model state, not params) are never touched, and
  # the kernels' scores equal jax.grad of an independently written loss on the probe batch.
  model = resnet.ResNet(num_classes=3, stage_sizes=(1,), widths=(4,))
  rng = np.random.default_rng(1)
  x_all = rng.normal(size=(3, 10, 6, 6, 2)).astype(np.float32)
  data = ClientData.from_arrays(x_all, rng.integers(0, 3, (3, 10)), np.array([10, 7, 10]))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))
  params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
  algo = SNIP(sparsity=0.75)
  key = jax.random.PRNGKey(3)
  new_params, state = probe.run_init_from_data(
      algo, model, lambda x, k, t: x, data, params, model_state, algo.init_state(params), 8,
      key)

  cid, x, y, w = probe_batch(data, 8, jax.random.split(key, 3)[0])

  def loss(p):
    logits, _ = model.apply({"params": p, **model_state}, x, train=True,
                            example_mask=w > 0, mutable=["batch_stats"])
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(8), y] * w) / jnp.sum(w)

  g = _kernels(jax.grad(loss)(params))
  scores = {n: np.abs(v * g[n]) for n, v in _kernels(params).items()}
  keep = _numpy_topk_keep(scores, 0.25)
  mask = _kernels(state.mask)
  assert set(mask) == {"stem/kernel", "layer1_0/conv1/kernel", "layer1_0/conv2/kernel",
                       "fc/kernel"}
  for n in keep:
    np.testing.assert_array_equal(mask[n], keep[n])
  total = sum(m.size for m in keep.values())
  assert sum(m.sum() for m in mask.values()) == int(np.ceil(0.25 * total))
  for path, m in jax.tree_util.tree_flatten_with_path(state.mask)[0]:
    if "bn" in jax.tree_util.keystr(path) or path[-1].key == "bias":
      assert np.asarray(m).all(), path      # BN scale/bias (and the fc bias) never pruned
  chex.assert_trees_all_equal(
      jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, state.mask), new_params)
  # The probe's training-mode forward does not leak into the BN statistics.
  chex.assert_trees_all_equal(model_state, {"batch_stats": variables["batch_stats"]})


def _probe_key(init_seed: int) -> jax.Array:
  """The key `train.build_experiment` hands `probe.run_init_from_data`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(init_seed),
                                               train.INIT_STREAM), train.DATA_INIT_TAG)


def test_probe_batch_is_reproducible_and_follows_the_key():
  exp = train.build_experiment(ExperimentConfig(**SMALL, workdir="/tmp/unused_snip"))
  data = exp.client_data
  a = probe_batch(data, 8, jax.random.PRNGKey(1))
  b = probe_batch(data, 8, jax.random.PRNGKey(1))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  cid = int(a[0])
  # The rows are examples of the drawn client, all real (16 >= batch 8).
  rows = np.asarray(data.x[cid])
  for row in np.asarray(a[1]):
    assert any(np.array_equal(row, r) for r in rows)
  assert np.asarray(a[3]).sum() == 8
  picked = {int(probe_batch(data, 8, jax.random.PRNGKey(s))[0]) for s in range(12)}
  assert len(picked) > 1      # the key decides the client
  # The run's probe key follows --init_seed: another seed draws another batch.
  x0, x1 = (np.asarray(probe_batch(data, 8, _probe_key(s))[1]) for s in (0, 1))
  assert not np.array_equal(x0, x1)


def test_mask_comes_from_the_drawn_clients_batch_and_stays_fixed(tmp_path):
  cfg = ExperimentConfig(**SMALL, workdir=str(tmp_path))
  exp = train.build_experiment(cfg)
  # Recompute the mask from the same probe batch with the model's own loss.
  batch_key, dropout_key, _ = jax.random.split(_probe_key(cfg.init_seed), 3)
  _, x, y, w = probe_batch(exp.client_data, cfg.batch_size, batch_key)
  x = preprocess.make_batch_fn(exp.dataset)(x, batch_key, False)
  dense = train.build_experiment(cfg.replace(algorithm="fedavg"))
  p0 = dense.init_state.params

  def loss(p):
    logits = dense.model.apply({"params": p, **dense.init_state.model_state}, x, train=True,
                               example_mask=w > 0, rngs={"dropout": dropout_key})
    return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y] * w) / jnp.sum(w)

  g = jax.grad(loss)(p0)
  scores = {n: np.abs(np.asarray(v) * _kernels(g)[n]) for n, v in _kernels(p0).items()}
  keep = _numpy_topk_keep(scores, 0.2)
  mask0 = _kernels(exp.init_state.algo_state.mask)
  for n in keep:
    np.testing.assert_array_equal(mask0[n], keep[n])
  states = []
  for e in (exp, train.build_experiment(cfg)):   # a second build: the run is deterministic
    state = e.init_state
    for _ in range(3):
      state, _ = e.round_step(state, e.client_data, e.train_key)
      for n, w_ in _kernels(jax.device_get(state.params)).items():
        assert not w_[~mask0[n]].any(), n        # pruned stays exactly 0
        assert w_[mask0[n]].all(), n             # and every kept weight trains (nonzero)
      assert all(np.array_equal(m, mask0[n])
                 for n, m in _kernels(jax.device_get(state.algo_state.mask)).items())
    states.append(jax.device_get(state))
  chex.assert_trees_all_equal(states[0].params, states[1].params)
  chex.assert_trees_all_equal(states[0].model_state, states[1].model_state)
  total = sum(m.size for m in mask0.values())
  assert sum(m.sum() for m in mask0.values()) == int(np.ceil(0.2 * total))


def test_run_is_deterministic_and_runs_from_the_launch_script(tmp_path):
  # Twice, by name and by import spec: the same class, so bit-identical metrics.
  rows = []
  for name, algorithm in (("a", "snip"), ("b", "sparsefl_jax.algorithms.snip:SNIP")):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
         f"--algorithm={algorithm}",
         "--sparsity=0.8", "--dataset=synthetic", "--model=small_cnn",
         "--synthetic_shape=8,8,1", "--synthetic_examples=16", "--synthetic_test=16",
         "--batch_size=8", "--num_clients=3", "--clients_per_round=2", "--rounds=2",
         "--noprogress", f"--workdir={tmp_path / name}"],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows.append([{k: v for k, v in json.loads(l).items() if k != "seconds"}
                 for l in open(tmp_path / name / "metrics.jsonl")])
  assert rows[0] == rows[1] and len(rows[0]) == 2


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_bad_sparsity_is_one_line(bad):
  with pytest.raises(ValueError, match=rf"sparsity={bad} must lie in \[0, 1\)"):
    SNIP(sparsity=bad)

"""SNIP: connection sensitivity on one client's batch at initialisation, a fixed mask."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import train
from sparsefl_jax.algorithms.snip import SNIP
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.data import preprocess
from sparsefl_jax.federated.probe import probe_batch

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


def test_scores_and_mask_match_an_independent_jax_grad_and_numpy():
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                        "bias": jnp.zeros((3,), jnp.float32)},
            "bn": {"scale": jnp.ones((5,)), "bias": jnp.zeros((5,))}}
  x = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 7))

  def loss(p):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = h * p["bn"]["scale"] + p["bn"]["bias"]
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(7), y])

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


def test_mask_comes_from_the_drawn_clients_batch_and_stays_fixed(tmp_path):
  cfg = ExperimentConfig(**SMALL, workdir=str(tmp_path))
  exp = train.build_experiment(cfg)
  # Recompute the mask from the same probe batch with the model's own loss.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.init_seed),
                                              train.INIT_STREAM), train.DATA_INIT_TAG)
  batch_key, dropout_key, _ = jax.random.split(key, 3)
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
  state = exp.init_state
  for _ in range(3):
    state, _ = exp.round_step(state, exp.client_data, exp.train_key)
    for n, w_ in _kernels(jax.device_get(state.params)).items():
      assert not w_[~mask0[n]].any(), n        # pruned stays exactly 0
    assert all(np.array_equal(m, mask0[n])
               for n, m in _kernels(jax.device_get(state.algo_state.mask)).items())
  total = sum(m.size for m in mask0.values())
  assert sum(m.sum() for m in mask0.values()) == int(np.ceil(0.2 * total))


def test_run_is_deterministic_and_runs_from_the_launch_script(tmp_path):
  rows = []
  for name in ("a", "b"):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--algorithm=snip",
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

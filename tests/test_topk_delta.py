"""Update Top-K: the upload is numpy's top-K of the delta (global / per tensor), the server
adds the example-weighted mean of the sparse deltas, the engine charges the upload's
non-zeros; one-line errors; a run through run.py with the method's flag."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import comm, train
from sparsefl_jax.algorithms.topk_delta import TopKDelta
from sparsefl_jax.config import ConfigError, ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "fc": {"kernel": (36, 5),
                                                                 "bias": (5,)},
          "bn": {"scale": (4,), "bias": (4,)}}


def random_tree(scale=1.0):
  return jax.tree.map(lambda s: jnp.asarray(scale * RNG.normal(size=s), jnp.float32), SHAPES,
                      is_leaf=lambda v: isinstance(v, tuple))


def np_topk_delta(local, glob, rho, scope):
  """numpy: Δ = local − global; keep |Δ| ≥ the ceil(ρ·n)-th largest |Δ| (all entries jointly
  for 'global', each tensor for 'layer')."""
  delta = jax.tree.map(lambda a, b: np.asarray(a, np.float32) - np.asarray(b, np.float32),
                       local, glob)

  def keep(arrays):
    flat = np.abs(np.concatenate([a.ravel() for a in arrays]))
    k = math.ceil(rho * flat.size - 1e-9)
    return np.sort(flat)[::-1][k - 1]

  if scope == "layer":
    return jax.tree.map(lambda d: np.where(np.abs(d) >= keep([d]), d, 0), delta)
  thr = keep(jax.tree.leaves(delta))
  return jax.tree.map(lambda d: np.where(np.abs(d) >= thr, d, 0), delta)


@pytest.mark.parametrize("scope,sparsity", [("global", 0.9), ("global", 0.5),
                                            ("layer", 0.9), ("layer", 0.7)])
def test_upload_is_the_top_k_of_the_delta(scope, sparsity):
  glob, local = random_tree(), random_tree()
  algo = TopKDelta(sparsity=sparsity, scope=scope)
  up = algo.client_upload(glob, local, (), jnp.int32(1))
  want = np_topk_delta(local, glob, 1 - sparsity, scope)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(up.values), want)
  leaves = jax.tree.leaves(want)
  if scope == "global":
    n = sum(x.size for x in leaves)
    assert sum(np.count_nonzero(x) for x in leaves) == math.ceil((1 - sparsity) * n - 1e-9)
  else:
    for x in leaves:
      assert np.count_nonzero(x) == math.ceil((1 - sparsity) * x.size - 1e-9)
  assert up.mask is None and up.extras is None


def test_other_threshold_methods_agree():
  glob, local = random_tree(), random_tree()
  uploads = [TopKDelta(sparsity=0.8, method=m).client_upload(glob, local, (), 1).values
             for m in ("bisection", "sort", "top_k")]
  for other in uploads[1:]:
    jax.tree.map(np.testing.assert_array_equal, uploads[0], other)


def test_server_adds_the_weighted_mean_of_the_sparse_deltas():
  glob = random_tree()
  locals_ = [random_tree() for _ in range(3)]
  n = np.asarray([5.0, 1.0, 2.0], np.float32)
  algo = TopKDelta(sparsity=0.75)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      algo.client_upload(glob, l, (), 1) for l in locals_])
  got = algo.aggregate(glob, stacked, jnp.asarray(n), (), 1)
  sparse = [np_topk_delta(l, glob, 0.25, "global") for l in locals_]
  want = jax.tree.map(
      lambda g, *d: np.asarray(g, np.float64) + sum(w * x for w, x in zip(n, d)) / n.sum(),
      glob, *sparse)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
  # Entries no client sent keep their value (the model stays dense).
  unsent = [np.all([x == 0 for x in xs], axis=0) for xs in zip(*[jax.tree.leaves(s)
                                                               for s in sparse])]
  for g, a, u in zip(jax.tree.leaves(glob), jax.tree.leaves(got), unsent):
    np.testing.assert_array_equal(np.asarray(a)[u], np.asarray(g)[u])
    assert u.any()


SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=16, num_clients=4,
             clients_per_round=3, batch_size=8, rounds=2, progress=False, tensorboard=False,
             checkpoint_every=0, algorithm="topk_delta", sparsity=0.9)


def test_engine_round_charges_the_uploads_non_zeros_and_streams(tmp_path):
  exp = train.build_experiment(ExperimentConfig(**SMALL, workdir=str(tmp_path)))
  params0 = jax.device_get(exp.init_state.params)
  n = sum(x.size for x in jax.tree.leaves(params0))
  state, m = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  k = math.ceil(0.1 * n - 1e-9)
  # mlp_small has no BatchNorm: the upload is all that is sent, k values per client.
  np.testing.assert_array_equal(np.asarray(m["uplink_nnz_per_client"]), k)
  # Bytes follow the non-zeros (the cheapest encoding of each tensor), far below dense f32.
  assert (np.asarray(m["uplink_bytes_per_client"]) < comm.VALUE_BYTES * n / 2).all()
  assert float(m["upload_density"]) == pytest.approx(k / n)
  params1 = jax.device_get(state.params)
  moved = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(params0),
                                                   jax.tree.leaves(params1)))
  assert 0 < moved <= 3 * k                  # only sent entries move
  assert int(m["nnz_params"]) == sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(params1))
  # The streamed aggregate (lax.map over clients) gives the stacked one's model.
  streamed = train.build_experiment(ExperimentConfig(**SMALL, client_map="map",
                                                     workdir=str(tmp_path)))
  state_m, _ = streamed.round_step(streamed.init_state, streamed.client_data,
                                   streamed.train_key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params1, jax.device_get(state_m.params))


@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.0), r"sparsity=1.0 must lie in \[0, 1\)"),
    (dict(scope="row"), r"topk_delta_scope='row' is not one of \['global', 'layer'\]"),
    (dict(uplink="weights"), r"uplink='weights': topk_delta sends updates"),
    (dict(method="median"), r"Unknown top-K method 'median'"),
])
def test_bad_values_are_one_line(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TopKDelta(**kwargs)


def test_bad_scope_in_the_config_is_one_line(tmp_path):
  cfg = ExperimentConfig(**SMALL, method_args={"topk_delta_scope": "row"},
                         workdir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"topk_delta_scope='row' is not one of"):
    cfg.validate()


def test_launch_script_runs_it_with_its_flag(tmp_path):
  args = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--algorithm=topk_delta",
          "--sparsity=0.9", "--dataset=synthetic", "--model=mlp_small",
          "--synthetic_shape=8,8,1", "--synthetic_examples=16", "--synthetic_test=16",
          "--batch_size=8", "--num_clients=3", "--clients_per_round=2", "--rounds=2",
          "--noprogress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(args + ["--topk_delta_scope=layer", f"--workdir={tmp_path / 'a'}"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.load(open(tmp_path / "a" / "config.json"))["method_args"] == {
      "topk_delta_scope": "layer"}
  rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert len(rows) == 2 and all(0.09 < r["upload_density"] < 0.12 for r in rows)
  bad = subprocess.run(args + ["--topk_delta_scope=row", f"--workdir={tmp_path / 'b'}"],
                       env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "topk_delta_scope" in bad.stderr
  assert len([l for l in bad.stderr.splitlines() if l.strip()]) == 1, bad.stderr

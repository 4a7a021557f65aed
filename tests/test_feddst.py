"""FedDST: ERK budgets, readjustment (prune |w|, regrow |g|) and the mask-count mean, against
numpy; streaming under map/chunked and 2 devices; runs through the library and run.py."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import train
from sparsefl_jax.algorithms.base import Upload
from sparsefl_jax.algorithms.feddst import FedDST, readjust_layer
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.federated.client import LocalStep
from sparsefl_jax.sparsity import distributions
from sparsefl_jax.tree_paths import is_kernel

import test_sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
PARAMS = {"conv": {"kernel": jnp.asarray(RNG.normal(size=(3, 3, 2, 4)), jnp.float32),
                   "bias": jnp.zeros((4,))},
          "fc": {"kernel": jnp.asarray(RNG.normal(size=(36, 5)), jnp.float32),
                 "bias": jnp.zeros((5,))}}


def np_readjust(w, g, m, keep, alpha):
  """numpy reference: keep floor((1-α)·keep) largest |w| of the active (ties by position),
  then regrow the largest |g| of the inactive back to `keep`."""
  w, g, m = np.abs(np.ravel(w)), np.abs(np.ravel(g)), np.ravel(m).astype(bool)
  kept = min(int(math.floor((1 - alpha) * keep)), int(m.sum()))
  active = np.flatnonzero(m)
  order = active[np.argsort(-w[active], kind="stable")]
  new = np.zeros_like(m)
  new[order[:kept]] = True
  inactive = np.flatnonzero(~new)
  grow = inactive[np.argsort(-g[inactive], kind="stable")][:max(keep - kept, 0)]
  new[grow] = True
  return new


def test_layer_budgets_are_erk_and_the_initial_mask_keeps_the_largest_weights():
  algo = FedDST(sparsity=0.8)
  counts = algo.layer_counts(PARAMS)
  dens = distributions.to_densities(distributions.erk(PARAMS, 0.8, filter_fn=is_kernel))
  for layer in ("conv", "fc"):
    n = PARAMS[layer]["kernel"].size
    assert counts[layer]["kernel"] == math.ceil(dens[layer]["kernel"] * n - 1e-9)
    assert counts[layer]["bias"] is None
  total = sum(jax.tree.leaves(counts))
  assert abs(total - 0.2 * (72 + 180)) <= 2            # ERK spends the global budget
  init = algo.init_params(PARAMS, None)
  state = algo.init_state(init)
  for layer in ("conv", "fc"):
    w = np.abs(np.asarray(PARAMS[layer]["kernel"])).ravel()
    k = counts[layer]["kernel"]
    want = np.zeros(w.size, bool)
    want[np.argsort(-w, kind="stable")[:k]] = True
    np.testing.assert_array_equal(np.asarray(state.mask[layer]["kernel"]).ravel(), want)
    np.testing.assert_array_equal(np.asarray(init[layer]["kernel"]).ravel(),
                                  np.where(want, np.ravel(PARAMS[layer]["kernel"]), 0))
    assert np.asarray(state.mask[layer]["bias"]).all()


def test_alpha_follows_the_cosine_decay_on_the_codes_zero_based_round():
  algo = FedDST(alpha=0.3, t_end=40)
  for t in (1, 2, 11, 21, 40, 41, 42, 81):
    s = t - 1
    want = 0.15 * (1 + math.cos(math.pi * s / 40)) if s < 40 else 0.0
    np.testing.assert_allclose(float(algo.alpha_t(t)), want, atol=1e-7)
  assert float(algo.alpha_t(1)) == pytest.approx(0.3)


@pytest.mark.parametrize("every,t_end,alpha,want", [
    (3, 10, 0.1, [2, 5, 8]),                 # s = 1, 4, 7 (dst.py: (s - 1) % R == 0)
    (1, 4, 0.1, [1, 2, 3, 4]),               # R = 1: every round while s < t_end
    (15, 200, 0.01, [2]),
    (3, 10, 0.0, []),                        # α = 0: never
])
def test_readjustment_rounds_follow_the_official_schedule(every, t_end, alpha, want):
  algo = FedDST(readjust_every=every, t_end=t_end, alpha=alpha)
  assert [t for t in range(1, 12) if bool(algo.is_readjust_round(t))] == want


@pytest.mark.parametrize("alpha,keep,active", [(0.3, 20, 20), (0.5, 20, 14), (0.01, 40, 40),
                                               (1.0, 10, 10), (0.2, 10, 25)])
def test_readjust_layer_matches_numpy(alpha, keep, active):
  rng = np.random.default_rng(keep + active)
  w = rng.normal(size=(8, 6)).astype(np.float32)
  g = rng.normal(size=(8, 6)).astype(np.float32)
  m = np.zeros(48, bool)
  m[rng.permutation(48)[:active]] = True
  m = m.reshape(8, 6)
  w = np.where(m, w, 0)
  got = np.asarray(readjust_layer(jnp.asarray(w), jnp.asarray(g), jnp.asarray(m), keep,
                                  jnp.float32(alpha)))
  want = np_readjust(w, g, m, keep, alpha).reshape(8, 6)
  np.testing.assert_array_equal(got, want)
  assert got.sum() == keep


def test_local_update_readjusts_only_at_the_first_step_of_the_last_epoch_of_its_rounds():
  algo = FedDST(sparsity=0.8, alpha=0.4, readjust_every=2, t_end=100, local_epochs=2)
  assert [bool(algo.is_readjust_round(t)) for t in (2, 3, 4)] == [True, False, True]
  params = algo.init_params(PARAMS, None)
  mask = algo.init_state(params).mask
  grads = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), jnp.float32), params)
  fn = jax.jit(algo.local_update)

  def mask_after(t, epoch, batch):
    _, new_params, _, new_mask = fn(grads, params, (), mask,
                                    LocalStep(jnp.int32(0), jnp.int32(epoch),
                                              jnp.int32(batch), jnp.int32(t)))
    return new_params, new_mask

  for t, epoch, batch in [(3, 1, 0), (1, 1, 0), (4, 0, 0), (4, 1, 1), (2, 0, 0)]:
    _, same = mask_after(t, epoch, batch)
    jax.tree.map(np.testing.assert_array_equal, same, mask)
  new_params, new = mask_after(4, 1, 0)
  alpha = float(algo.alpha_t(4))
  counts = algo.layer_counts(params)
  for layer in ("conv", "fc"):
    want = np_readjust(params[layer]["kernel"], grads[layer]["kernel"],
                       mask[layer]["kernel"], counts[layer]["kernel"], alpha)
    np.testing.assert_array_equal(np.asarray(new[layer]["kernel"]).ravel(), want)
    # Pruned entries are zeroed; regrown ones start at 0.
    regrown = want & ~np.asarray(mask[layer]["kernel"]).ravel()
    assert regrown.any()
    assert not np.asarray(new_params[layer]["kernel"]).ravel()[regrown].any()
    assert not np.asarray(new_params[layer]["kernel"]).ravel()[~want].any()


def np_aggregate(vals, masks, n, min_votes, budget):
  """numpy reference: mean over the holders (n-weighted), votes >= max(1, min_votes), then
  the largest |mean| down to `budget` when more survive."""
  held = np.tensordot(n, masks.astype(np.float64), 1)
  mean = np.where(held > 0, np.tensordot(n, vals.astype(np.float64), 1)
                  / np.where(held > 0, held, 1), 0)
  survive = masks.sum(0) >= max(1, min_votes)
  if survive.sum() > budget:
    order = np.argsort(-np.abs(np.where(survive, mean, 0)).ravel(), kind="stable")[:budget]
    cut = np.zeros(mean.size, bool)
    cut[order] = True
    survive &= cut.reshape(mean.shape)
  return np.where(survive, mean, 0)


@pytest.mark.parametrize("min_votes,density,cut", [
    (0, (0.4, 0.4), True), (2, (0.7, 0.7), True), (3, (0.3, 0.3), False),
    (2, (0.15, 0.15), False),
    (0, (0.9, 0.2), True)])           # denser than S overall, but layer b under its k_l
def test_aggregate_is_the_mask_count_mean_with_min_votes_and_a_layerwise_cut_back(
    min_votes, density, cut):
  algo = FedDST(sparsity=0.5, min_votes=min_votes)
  rng = np.random.default_rng(3)
  params = {"a": {"kernel": jnp.zeros((6, 4)), "bias": jnp.zeros((4,))},
            "b": {"kernel": jnp.zeros((4, 5)), "bias": jnp.zeros((5,))}}
  counts = algo.layer_counts(params)
  k = 3
  n = np.asarray([3.0, 1.0, 2.0], np.float32)
  masks = {l: rng.random((k, *params[l]["kernel"].shape)) < d
           for l, d in zip(params, density)}
  vals = {l: np.where(masks[l], rng.normal(size=masks[l].shape), 0).astype(np.float32)
          for l in params}
  bias = {l: rng.normal(size=(k, *params[l]["bias"].shape)).astype(np.float32)
          for l in params}
  survivors = sum(int((masks[l].sum(0) >= max(1, min_votes)).sum()) for l in params)
  assert (survivors > sum(jax.tree.leaves(counts))) == cut     # the case under test
  uploads = Upload({l: {"kernel": jnp.asarray(vals[l]), "bias": jnp.asarray(bias[l])}
                    for l in params},
                   {l: {"kernel": jnp.asarray(masks[l]), "bias": jnp.ones((k, *params[l][
                       "bias"].shape), bool)} for l in params})
  got = algo.aggregate(params, uploads, jnp.asarray(n), algo.init_state(params), 1)
  for l in params:
    budget = counts[l]["kernel"] if cut else masks[l][0].size
    want = np_aggregate(vals[l], masks[l], n, min_votes, budget)
    np.testing.assert_allclose(np.asarray(got[l]["kernel"]), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got[l]["bias"]), n @ bias[l] / n.sum(), rtol=1e-6)
    if cut:
      assert (np.asarray(got[l]["kernel"]) != 0).sum() <= counts[l]["kernel"]
  if density == (0.9, 0.2):
    assert 0 < (np.asarray(got["b"]["kernel"]) != 0).sum() < counts["b"]["kernel"]


def test_server_optimizer_is_projected_back_to_the_budget():
  algo = FedDST(sparsity=0.8)
  dense = jax.tree.map(lambda p: p + 1.0, PARAMS)     # e.g. momentum moved pruned weights
  new, state = algo.server_post(dense, algo.init_state(algo.init_params(PARAMS, None)), 2)
  counts = algo.layer_counts(PARAMS)
  for l in ("conv", "fc"):
    assert int(np.sum(np.asarray(new[l]["kernel"]) != 0)) == counts[l]["kernel"]
    np.testing.assert_array_equal(np.asarray(state.mask[l]["kernel"]),
                                  np.asarray(new[l]["kernel"]) != 0)
    np.testing.assert_array_equal(np.asarray(new[l]["bias"]), np.asarray(dense[l]["bias"]))


def dst_method():
  """FedDST on test_sharding's BN + softmax model: readjusting every round."""
  return FedDST(sparsity=0.5, alpha=0.5, readjust_every=1, t_end=10, local_epochs=2)


@pytest.mark.parametrize("client_map,chunk", [("map", 1), ("chunked", 2)])
def test_streamed_aggregate_equals_vmap(client_map, chunk):
  algo = dst_method().bind()
  streamed = test_sharding.run_rounds(algo, client_map, chunk, stream=True, rounds=3)
  test_sharding.assert_same(streamed, test_sharding.run_rounds(algo, "vmap", chunk, rounds=3))
  kernel = np.asarray(streamed[0].params["fc"]["kernel"])
  assert 0 < (kernel != 0).mean() <= 0.55


def test_two_simulated_devices_match_one():
  script = textwrap.dedent(f"""
      import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      import jax, test_sharding as t, test_feddst as f
      assert jax.device_count() == 2
      algo = f.dst_method().bind()
      for cm in ("vmap", "map"):
        ref = t.run_rounds(algo, cm, 2, k=5, num_devices=1, rounds=3)
        t.assert_same(ref, t.run_rounds(algo, cm, 2, k=5, num_devices=2, rounds=3))
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


SMALL = dict(dataset="synthetic", model="small_cnn", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=16, num_clients=4,
             clients_per_round=3, batch_size=8, rounds=4, progress=False, tensorboard=False,
             checkpoint_every=0, algorithm="feddst", sparsity=0.8,
             method_args={"feddst_alpha": 0.3, "feddst_readjust_every": 2,
                          "feddst_t_end": 10})


def test_library_run_keeps_the_budget_and_readjusts_in_its_rounds(tmp_path):
  cfg = ExperimentConfig(**SMALL, workdir=str(tmp_path / "a"))
  exp = train.build_experiment(cfg)
  budget = sum(jax.tree.leaves(exp.algorithm.layer_counts(exp.init_state.params)))

  def kernel_masks(state):
    return [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(
        jax.device_get(state.algo_state.mask))[0] if p[-1].key == "kernel"]

  state = exp.init_state
  masks = [kernel_masks(state)]
  assert sum(int(k.sum()) for k in masks[0]) == budget
  for t in range(1, 5):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    masks.append(kernel_masks(state))
    assert sum(int(k.sum()) for k in masks[-1]) == budget          # density stays S
    readjust = t in (2, 4)               # s = t - 1 with (s - 1) % 2 == 0
    moved = any(not np.array_equal(a, b) for a, b in zip(masks[-2], masks[-1]))
    assert moved == readjust, t
    # The mask goes up only in readjustment rounds.
    assert (m["uplink_mask_bits_per_client"].sum() > 0) == readjust, t
  train.run(cfg)
  train.run(cfg.replace(workdir=str(tmp_path / "b")))
  rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"}
           for l in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
  assert rows[0] == rows[1]


def test_launch_script_takes_the_declared_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "run.py"),
       "--algorithm=sparsefl_jax.algorithms.feddst:FedDST",
       "--sparsity=0.8", "--feddst_alpha=0.2", "--feddst_readjust_every=1",
       "--dataset=synthetic", "--model=small_cnn", "--synthetic_shape=8,8,1",
       "--synthetic_examples=16", "--synthetic_test=16", "--batch_size=8", "--num_clients=3",
       "--clients_per_round=2", "--rounds=2", "--noprogress", f"--workdir={tmp_path}"],
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = json.load(open(tmp_path / "config.json"))
  assert cfg["method_args"]["feddst_alpha"] == 0.2
  assert len(open(tmp_path / "metrics.jsonl").readlines()) == 2
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--algorithm=feddst",
       "--sparsity=0.8", "--feddst_alpha=1.5", f"--workdir={tmp_path}/bad"],
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=300)
  assert bad.returncode == 2 and "feddst_alpha=1.5 must lie in [0, 1]" in bad.stderr


@pytest.mark.parametrize("t_end, refused", [(0, True), (4, False)])
def test_rounds_are_fixed_on_resume_only_when_t_end_follows_them(tmp_path, t_end, refused):
  from sparsefl_jax.config import ConfigError
  cfg = ExperimentConfig(**{**SMALL, "rounds": 3, "checkpoint_every": 1,
                            "method_args": {"feddst_t_end": t_end}},
                         workdir=str(tmp_path / "r"))
  train.run(cfg, max_rounds=2)
  if refused:
    with pytest.raises(ConfigError, match=r"rounds=5.*feddst_t_end=0"):
      train.run(cfg.replace(rounds=5, resume=True))
  else:
    assert train.run(cfg.replace(rounds=5, resume=True))["round"] == 5

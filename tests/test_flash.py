"""FLASH: the DST readjustment, stage 1's density rescaling + re-initialisation and JMWST's
server mask against numpy (the authors' code transcribed literally); the DST schedule of a
client with its own n_k; SPDST's fixed mask, JMWST's mask rounds, bit-identical resume
across the stage boundary, run.py flags."""
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pytest import approx

from sparsefl_jax import train
from sparsefl_jax.algorithms.base import Phase, Upload
from sparsefl_jax.algorithms.flash import DST, FIXED, FLASH, HUNT, fresh_init, keep_largest, \
    redistribute, truncate
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated.client import LocalStep
from sparsefl_jax.federated.optimizers import client_optimizer
from sparsefl_jax.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
PARAMS = {"conv": {"kernel": jnp.asarray(RNG.normal(size=(3, 3, 2, 8)), jnp.float32),
                   "bias": jnp.zeros((8,))},
          "fc1": {"kernel": jnp.asarray(RNG.normal(size=(72, 16)), jnp.float32),
                  "bias": jnp.zeros((16,))},
          "fc2": {"kernel": jnp.asarray(RNG.normal(size=(16, 5)), jnp.float32),
                  "bias": jnp.zeros((5,))}}
ORDER = ("conv", "fc1", "fc2")


def bound(**kw):
  algo, _ = FLASH(**{"sparsity": 0.8, **kw}).setup(PARAMS, ORDER)
  return algo


# ---- the DST readjustment against the code (core.py's Masking.truncate_weights) ----------
def np_truncate(ws, ms, rate, adjusted, adjustments, baseline):
  """core.py transcribed (float64, its 1000-pass residual loop); growth returns the count."""
  names = range(len(ws))
  var = {}
  for i in names:
    var[i] = np.abs(ws[i])[ms[i]].mean() if ms[i].any() else np.nan
  total = sum(v for v in var.values() if not np.isnan(v))
  var = {i: v / total for i, v in var.items()}
  nonzeros = {i: int(ms[i].sum()) for i in names}
  zeros = {i: ms[i].size - nonzeros[i] for i in names}
  rates = {}
  for i in names:
    rates[i] = rate
    sparsity = zeros[i] / ms[i].size
    if sparsity < 0.2 and (1.0 / len(var)) / var[i] < 1.0:
      rates[i] = min(sparsity, rates[i])
  new, removed_total = {}, 0
  for i in names:
    num_remove = math.ceil(rates[i] * nonzeros[i])
    if num_remove == 0:
      new[i] = ws[i] != 0
    else:
      k = math.ceil(zeros[i] + num_remove)
      m = ms[i].copy().ravel()
      m[np.argsort(np.abs(ws[i]).ravel(), kind="stable")[:k]] = False
      new[i] = m.reshape(ms[i].shape)
    removed_total += nonzeros[i] - int(new[i].sum())
  regrowth, residual, mean_residual, it = {}, 9999, 0, 0
  while residual > 0 and it < 1000:
    residual = 0
    for i in names:
      max_regrowth = zeros[i] + math.ceil(rates[i] * nonzeros[i])
      g = regrowth[i] if i in regrowth else math.ceil(var[i] * (removed_total + adjusted))
      g += mean_residual
      if g > 0.99 * max_regrowth:
        regrowth[i] = 0.99 * max_regrowth
        residual += g - regrowth[i]
      else:
        regrowth[i] = g
    mean_residual = residual / len(regrowth)
    it += 1
  counts = [min(max(math.floor(regrowth[i]), 0), int((~new[i]).sum())) for i in names]
  total_new = sum(int(new[i].sum()) + c for i, c in zip(names, counts))
  adjustments = adjustments + [baseline - total_new]
  adjusted = 0.25 * adjusted + 0.75 * (baseline - total_new) + np.mean(adjustments)
  return [new[i] for i in names], counts, adjusted


TRUNCATE = jax.jit(truncate)   # one compilation for every case (same shapes)


def _layers(densities, shapes, seed, dead=0):
  rng = np.random.default_rng(seed)
  ws, ms = [], []
  for d, shape in zip(densities, shapes):
    m = rng.random(shape) < d
    w = np.where(m, rng.normal(size=shape), 0).astype(np.float32)
    ws.append(w)
    ms.append(m)
  if dead:   # active weights that are exactly 0 (dropped when nothing is pruned)
    ws[0].ravel()[np.flatnonzero(ms[0])[:dead]] = 0
  return ws, ms


@pytest.mark.parametrize("densities,rate,adjusted,adjustments,scale,dead", [
    ((0.3, 0.25, 0.4), 0.25, 0.0, [], (1, 1, 1), 0),
    ((0.3, 0.95, 0.2), 0.2, 3.5, [2.0, 5.0], (1, 8, 1), 0),    # a dense, heavy layer: its
    ((0.9, 0.97, 0.1), 0.25, -2.0, [-2.0], (1, 6, 1), 0),     # rate is cut, its growth capped
    ((0.3, 0.25, 0.4), 0.0, 0.0, [], (1, 1, 1), 3),           # nothing pruned: w != 0
    ((0.6, 0.5, 0.6), 0.125, 40.0, [10.0], (1, 1, 1), 0),
])
def test_readjustment_matches_the_codes_truncate_weights(densities, rate, adjusted,
                                                         adjustments, scale, dead):
  shapes = [(6, 8), (5, 9), (4, 7)]
  ws, ms = _layers(densities, shapes, seed=int(rate * 100) + len(adjustments), dead=dead)
  ws = [w * s for w, s in zip(ws, scale)]
  baseline = 0.3 * sum(m.size for m in ms)
  want_masks, want_counts, want_adjusted = np_truncate(ws, ms, rate, adjusted, adjustments,
                                                      baseline)
  out = TRUNCATE(ws, ms, np.float32(rate), np.float32(adjusted),
                 np.float32(sum(adjustments)), np.int32(len(adjustments)),
                 np.float32(baseline), jax.random.PRNGKey(3))
  np.testing.assert_array_equal(np.asarray(out.regrown), want_counts)
  for got, pruned, old, count in zip(out.masks, want_masks, ms, want_counts):
    got = np.asarray(got)
    assert (got & ~pruned).sum() == count            # regrown: exactly the budget
    assert (got[pruned]).all()                       # and every survivor kept
    assert (got & ~old).sum() <= count               # (a pruned weight may come back)
  np.testing.assert_array_equal(np.asarray(out.removed),
                                [int(m.sum() - p.sum()) for m, p in zip(ms, want_masks)])
  np.testing.assert_allclose(float(out.adjusted), want_adjusted, rtol=1e-5, atol=1e-4)
  assert int(out.adj_count) == len(adjustments) + 1
  if densities[1] == 0.95:   # the case under test: the heavy dense layer hit its cap
    assert want_counts[1] == math.floor(0.99 * (int((~ms[1]).sum()) + math.ceil(
        min(rate, (~ms[1]).mean()) * ms[1].sum())))


def test_keep_largest_is_a_stable_sort_selection():
  """Bisection + position tie-break == numpy's stable argsort of -score (ties, zeros,
  counts beyond the candidates, 0 and negative counts)."""
  keep = jax.jit(keep_largest)
  rng = np.random.default_rng(7)
  for trial in range(60):
    shape = (5, 7)                                          # one compilation
    score = np.abs(rng.normal(size=shape)).astype(np.float32)
    if trial % 2:
      score = np.round(score * 2) / 2                       # many ties, exact zeros
    cand = rng.random(shape) < rng.random()
    count = int(rng.integers(-1, score.size + 3))
    idx = np.flatnonzero(cand)
    want = np.zeros(score.size, bool)
    want[idx[np.argsort(-score.ravel()[idx], kind="stable")][:max(count, 0)]] = True
    np.testing.assert_array_equal(np.asarray(keep(score, cand, count)).ravel(), want)


@pytest.mark.parametrize("growth,cap", [
    ([3.0, 50.0, 7.0, 1.0], [10.0, 4.0, 9.0, 100.0]),     # one layer over its cap
    ([30.0, 50.0, 7.0, 1.0], [10.0, 4.0, 9.0, 100.0]),    # two, and a cascade
    ([30.0, 50.0], [10.0, 4.0]),                          # cannot hold the total: all capped
    ([2.0, 3.0], [5.0, 5.0]),                             # nothing to move
    ([-4.0, 9.0, 1.0], [2.0, 3.0, 20.0])])
def test_redistribution_is_the_codes_residual_loop(growth, cap):
  g, residual, mean_residual, it = {}, 9999, 0.0, 0
  while residual > 0 and it < 1000:
    residual = 0.0
    for i in range(len(growth)):
      x = (g[i] if i in g else growth[i]) + mean_residual
      g[i] = min(x, cap[i])
      residual += x - g[i]
    mean_residual = residual / len(g)
    it += 1
  got = np.asarray(jax.jit(redistribute)(jnp.asarray(growth, jnp.float32),
                                         jnp.asarray(cap, jnp.float32)))
  np.testing.assert_allclose(got, [g[i] for i in range(len(growth))], rtol=1e-5)


# ---- the client's schedule (its own n_k through client_examples) ---------------------------
def test_readjustment_schedule_follows_each_clients_batches():
  algo = bound(init_epochs=3, local_epochs=1, prune_rate=0.25)

  def fires(phase, batches, epochs, steps):
    a = algo.for_phase(phase)
    return [(e, b, float(r), int(s)) for e in range(epochs) for b in range(steps)
            for now, r, s in [a.readjust_schedule(LocalStep(0, jnp.int32(e), jnp.int32(b)),
                                                  jnp.int32(batches))] if bool(now)]
  # E = 3 (stage 1): after the last real batch of epochs 0 and 1 = before the first batch of
  # epochs 1 and 2, after s = 4 and 8 of T = 12 steps; p·(T - s)/T.
  assert fires(HUNT, 4, 3, 6) == [(1, 0, approx(0.25 * 8 / 12), 4),
                                  (2, 0, approx(0.25 * 4 / 12), 8)]
  assert fires(HUNT, 1, 3, 6) == [(1, 0, approx(0.25 * 2 / 3), 1),
                                  (2, 0, approx(0.25 * 1 / 3), 2)]
  # E = 1 (JMWST's default): after batch nb // 2 (core.py: batch_idx == len(loader) // 2).
  assert fires(DST, 5, 1, 8) == [(0, 2, approx(0.25 * 2 / 5), 3)]
  assert fires(DST, 1, 1, 8) == [(0, 0, 0.0, 1)]


@pytest.mark.parametrize("epochs", [3, 1])
def test_client_training_equals_a_plain_loop_of_the_codes_steps(epochs):
  """One client (13 examples, batch 8: 2 real batches, padded to 3) against a plain loop:
  SGD on jax.grad of the batch loss, mask re-applied after each step, `truncate` after the
  last batch of every epoch but the last (E = 1: after batch 2 // 2 = 1)."""
  model = get_model("mlp_small", 4)
  x = jnp.asarray(RNG.normal(size=(23, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(RNG.integers(0, 4, (23,)))
  n, bsz, lr = 13, 8, 0.5
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]
  algo, _ = FLASH(sparsity=0.6, init_epochs=epochs, batch_size=bsz).setup(params, ("fc1", "fc2"))
  params, state = jax.jit(lambda p, k: algo.init_from_data(p, algo.init_state(p), None, k))(
      params, jax.random.PRNGKey(1))
  hunt, cfg, key = algo.for_phase(HUNT), client_lib.LocalConfig(epochs, bsz, 23), \
      jax.random.PRNGKey(2)
  got = jax.jit(lambda: client_lib.local_train(
      hunt, model, lambda v, k, t: v, cfg, lambda: client_optimizer(lr), params, {}, state, x,
      y, jnp.int32(n), key, jnp.int32(1)))()

  order_key, _, init_key = jax.random.split(key, 3)
  orders = np.asarray(client_lib.epoch_orders(order_key, jnp.int32(n), cfg))
  grad = jax.jit(jax.grad(lambda p, xb, yb, wb: jnp.sum(client_lib.cross_entropy(
      model.apply({"params": p}, xb), yb) * wb) / jnp.sum(wb)))
  trunc = jax.jit(truncate)
  w, mask, extra = params, state.mask, (0.0, 0.0, 0)
  nb, steps = 2, 0
  for e in range(epochs):
    for b in range(nb):
      idx = orders[e, b * bsz:(b + 1) * bsz]
      wb = ((b * bsz + np.arange(bsz)) < n).astype(np.float32)
      g = grad(w, x[idx], y[idx], wb)
      w = jax.tree.map(lambda p, d, m: jnp.where(m, p - lr * jnp.where(m, d, 0), 0), w, g, mask)
      steps += 1
      if (epochs > 1 and b == nb - 1 and e < epochs - 1) or (epochs == 1 and b == nb // 2):
        out = trunc(hunt.pruned_leaves(w), hunt.pruned_leaves(mask),
                    np.float32(0.25 * (epochs * nb - steps) / (epochs * nb)), *extra,
                    np.float32(0.4 * sum(hunt.sizes(w))), jax.random.fold_in(init_key, steps))
        mask = hunt.with_pruned(mask, out.masks)
        w = jax.tree.map(lambda p, m: jnp.where(m, p, 0), w, mask)
        extra = (out.adjusted, out.adj_sum, out.adj_count)
  assert int(got.client_state.adj_count) == int(extra[2]) == (epochs - 1 if epochs > 1 else 1)
  chex.assert_trees_all_equal(got.client_state.mask, mask)
  chex.assert_trees_all_close(got.params, w, rtol=1e-5, atol=1e-6)


# ---- stage 1: rescaled layer densities, fresh model, random mask ---------------------------
def _stacked_upload(algo, counts_per_client, values=None):
  masks = []
  for counts in counts_per_client:
    layer_masks = []
    for n, c in zip(algo.sizes(PARAMS), counts):
      m = np.zeros(n, bool)
      m[RNG.permutation(n)[:c]] = True
      layer_masks.append(m.reshape(np.shape(algo.pruned_leaves(PARAMS)[len(layer_masks)])))
    masks.append(layer_masks)
  stacked = tuple(jnp.asarray(np.stack(ms)) for ms in zip(*masks))
  if values is None:
    values = jax.tree.map(lambda p: jnp.zeros((len(masks), *p.shape)), PARAMS)
  return Upload(values, stacked, jnp.ones((len(masks),), bool))


def test_stage_one_rescales_the_mean_layer_densities_and_reinitialises():
  algo = bound(layers="conv,fc1", sparsity=0.75)       # fc2 stays dense
  params, state = jax.jit(lambda p, s, k: algo.init_from_data(p, s, None, k))(
      PARAMS, algo.init_state(PARAMS), jax.random.PRNGKey(5))
  sizes = algo.sizes(PARAMS)                            # conv 144, fc1 1152
  assert [int(m.sum()) for m in algo.pruned_leaves(state.mask)] == [36, 288]   # ceil(d·n)
  hunt = algo.for_phase(HUNT)
  counts = [(100, 200), (80, 260), (120, 250)]
  new_params, new_state = jax.jit(lambda p, up, w, s: hunt.server_post(
      hunt.aggregate(p, up, w, s, 1), s, 1))(params, _stacked_upload(hunt, counts),
                                             jnp.asarray([1.0, 5.0, 2.0]), state)
  # numpy: δ_l = mean_k nnz/n_l (unweighted), ratio = d·N/Σ δ_l n_l, k_l = ceil(min(1, δ_l·r)·n_l)
  dens = np.mean(np.asarray(counts, np.float64), 0) / sizes
  ratio = 0.25 * sum(sizes) / float(np.sum(dens * sizes))
  want = [math.ceil(min(1.0, d * ratio) * n - 1e-9) for d, n in zip(dens, sizes)]
  assert want[0] / sizes[0] > 0.25 > want[1] / sizes[1]     # the hunt moved the budget
  got_masks = [np.asarray(m) for m in hunt.pruned_leaves(new_state.mask)]
  assert [int(m.sum()) for m in got_masks] == want
  for w, m in zip(hunt.pruned_leaves(new_params), got_masks):
    np.testing.assert_array_equal(np.asarray(w) != 0, m)   # exactly the new mask
  # Re-initialised: fresh kernels (fc2 too, dense), biases at their initial values.
  for layer in ORDER:
    k_new, k_old = np.asarray(new_params[layer]["kernel"]), np.asarray(PARAMS[layer]["kernel"])
    assert not np.any((k_new == k_old) & (k_new != 0))
    np.testing.assert_array_equal(np.asarray(new_params[layer]["bias"]),
                                  np.asarray(PARAMS[layer]["bias"]))
  assert np.all(np.asarray(new_params["fc2"]["kernel"]) != 0)
  assert np.asarray(new_state.mask["fc2"]["kernel"]).all()
  # ... and the random mask is another draw than M0.
  assert not np.array_equal(got_masks[1], np.asarray(state.mask["fc1"]["kernel"]))


def test_fresh_initialisation_is_the_layers_own_initialiser():
  """LeCun normal (truncated at 2σ', σ' = sqrt(1/fan_in)/0.8796), what models.layers' Conv
  and Dense default to and every model uses; biases/BatchNorm keep their values."""
  model = get_model("small_cnn", 10)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  template = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype), shapes["params"])
  init = jax.jit(fresh_init)
  fresh, again = init(template, jax.random.PRNGKey(1)), init(template, jax.random.PRNGKey(1))
  chex.assert_trees_all_equal(fresh, again)
  other = init(template, jax.random.PRNGKey(2))
  kinds = set()
  for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(template)[0],
                             jax.tree.leaves(fresh), jax.tree.leaves(other)):
    a, b = np.asarray(a), np.asarray(b)
    if path[-1].key != "kernel":
      np.testing.assert_array_equal(a, b)
      continue
    kinds.add(a.ndim)
    std = np.sqrt(1.0 / np.prod(a.shape[:-1]))
    assert b.shape == a.shape and not np.array_equal(b, np.asarray(c))
    assert np.abs(b).max() <= 2 * std / 0.87962566 + 1e-6
    if a.size > 2000:
      np.testing.assert_allclose(b.std(), std, rtol=0.1)
  assert kinds == {2, 4}                       # conv and dense kernels


# ---- JMWST's server mask ---------------------------------------------------------------------
def test_jmwst_mask_is_the_mean_client_counts_times_top_weights_of_the_average():
  algo = bound(mode="jmwst", sparsity=0.8).for_phase(DST)
  k = 3
  counts = [(30, 250, 20), (40, 200, 30), (35, 260, 10)]
  values = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=(k, *p.shape)), jnp.float32),
                        PARAMS)
  n = np.asarray([2.0, 1.0, 3.0], np.float32)
  up = _stacked_upload(algo, counts, values)
  new_params, state = jax.jit(lambda up, w, s: algo.server_post(
      algo.aggregate(PARAMS, up, w, s, 2), s, 2))(up, jnp.asarray(n), algo.init_state(PARAMS))
  sizes = algo.sizes(PARAMS)
  nu = np.mean(np.asarray(counts, np.float64), 0)
  ratio = min(1.0, 0.2 * sum(sizes) / nu.sum())
  for (layer, size), c in zip(zip(ORDER, sizes), nu):
    mean = np.tensordot(n, np.asarray(values[layer]["kernel"], np.float64), 1) / n.sum()
    keep = int(c * ratio)
    want = np.zeros(size, bool)
    want[np.argsort(-np.abs(mean).ravel(), kind="stable")[:keep]] = True
    np.testing.assert_array_equal(np.asarray(state.mask[layer]["kernel"]).ravel(), want)
    np.testing.assert_allclose(np.asarray(new_params[layer]["kernel"]).ravel(),
                               np.where(want, mean.ravel(), 0), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(new_params[layer]["bias"]),
                               n @ np.asarray(values[layer]["bias"]) / n.sum(), rtol=2e-6)


def test_sparsyfed_variant_thresholds_layers_then_globally():
  algo = bound(variant="sparsyfed", sparsity=0.8, layers="fc1,fc2").for_phase(HUNT)
  k = 3
  values = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=(k, *p.shape)), jnp.float32),
                        PARAMS)
  n = np.asarray([2.0, 1.0, 3.0], np.float32)
  ups, cand = jax.jit(lambda vals, w, s: (lambda u: (u, algo.aggregate(PARAMS, u, w, s, 1)))(
      jax.vmap(lambda v: algo.client_upload(None, v, None, 1))(vals)))(
          values, jnp.asarray(n), algo.init_state(PARAMS))
  # numpy: clients keep the global top 20 % of fc1+fc2; δ_l example-weighted; layer top
  # int(n_l·δ_l); then the global top int(0.2·N) of the two, ties kept.
  up = {l: np.asarray(ups.values[l]["kernel"], np.float64) for l in ("fc1", "fc2")}
  for c in range(k):
    both = np.concatenate([np.asarray(values[l]["kernel"][c]).ravel() for l in up])
    thr = np.sort(np.abs(both))[::-1][math.ceil(0.2 * both.size) - 1]
    for l in up:
      np.testing.assert_array_equal(up[l][c] != 0,
                                    np.abs(np.asarray(values[l]["kernel"][c])) >= thr)
  out = {}
  for l in up:
    dens = float(n @ (up[l] != 0).reshape(k, -1).mean(1) / n.sum())
    mean = np.tensordot(n, up[l], 1) / n.sum()
    keep = int(mean.size * dens)
    thr = np.sort(np.abs(mean).ravel())[::-1][keep - 1]
    out[l] = np.where(np.abs(mean) >= thr, mean, 0)
  both = np.concatenate([v.ravel() for v in out.values()])
  thr = np.sort(np.abs(both))[::-1][int(both.size * 0.2) - 1]
  for l in up:
    want = np.where(np.abs(out[l]) >= thr, out[l], 0)
    np.testing.assert_allclose(np.asarray(cand[l]["kernel"]), want, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(cand["conv"]["kernel"]),    # not pruned
                             np.tensordot(n, np.asarray(values["conv"]["kernel"]), 1) / n.sum(),
                             rtol=2e-6, atol=1e-7)


# ---- settings -------------------------------------------------------------------------------
def test_pruned_layers_default_to_convolutions_for_resnet18():
  model = get_model("resnet18", 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))["params"]
  cfg = ExperimentConfig(algorithm="flash", model="resnet18", sparsity=0.9)
  algo, _ = FLASH.from_config(cfg).setup(shapes, ())
  assert len(algo.scope) == 20 and "fc" not in algo.scope     # 17 3x3 + 3 shortcut convs
  plain, _ = FLASH.from_config(cfg.replace(model="fmnist_fc")).setup(PARAMS, ORDER)
  assert plain.scope == ORDER
  assert bound(layers="middle").scope == ("fc1",)
  assert bound(layers="conv").scope == ("conv",)
  with pytest.raises(ConfigError, match=r"sparse_layers='fc1,fc9' names unknown layers "
                                        r"\['fc9'\]"):
    bound(layers="fc1,fc9")


@pytest.mark.parametrize("args,message", [
    ({"flash_init_frac": 0.0}, r"flash_init_frac=0.0 must lie in \(0, 1\]"),
    ({"flash_init_epochs": 0}, r"flash_init_epochs=0 must be >= 1"),
    ({"flash_prune_rate": 1.5}, r"flash_prune_rate=1.5 must lie in \[0, 1\]"),
    ({"flash_mode": "rigl"}, r"flash_mode='rigl' is not one of \['spdst', 'jmwst'\]"),
    ({"flash_variant": "sparsyfed", "flash_mode": "jmwst"}, r"use flash_mode=spdst"),
])
def test_bad_settings_are_one_line(args, message):
  cfg = ExperimentConfig(algorithm="flash", sparsity=0.9, method_args=args)
  with pytest.raises(ConfigError, match=message):
    FLASH.from_config(cfg.validate())


def test_a_server_optimizer_is_refused():
  with pytest.raises(ConfigError, match=r"server_optimizer='adam' with algorithm='flash'"):
    FLASH.from_config(ExperimentConfig(algorithm="flash", sparsity=0.9,
                                       server_optimizer="adam"))


# ---- whole runs -----------------------------------------------------------------------------
SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=24, synthetic_test=16, num_clients=6,
             clients_per_round=3, batch_size=8, rounds=3, progress=False, tensorboard=False,
             checkpoint_every=0, algorithm="flash", sparsity=0.8, client_map="map")


def test_phases_of_each_mode():
  assert [FLASH(mode="spdst").round_phase(t) for t in range(1, 6)] == [HUNT] + [FIXED] * 4
  assert [FLASH(mode="jmwst").round_phase(t) for t in range(1, 5)] == [HUNT] + [DST] * 3
  assert [FLASH(mode="jmwst", update_interval=3).round_phase(t) for t in range(1, 9)] == [
      HUNT, DST, FIXED, FIXED, DST, FIXED, FIXED, DST]     # the code: round_idx % r_int == 0
  algo = FLASH(num_clients=100, init_frac=0.05, init_epochs=10, local_epochs=2)
  assert algo.phase_settings(HUNT) == Phase(clients_per_round=5, local_epochs=10)
  assert algo.phase_settings(FIXED) == algo.phase_settings(DST) == Phase()


def test_jmwst_run_hunts_once_then_updates_the_mask_in_its_rounds_only(tmp_path):
  """r_int = 2: round 1 hunts, rounds 2 and 4 run DST and update the mask, round 3 trains
  inside the fixed mask (SPDST's stage-2 round)."""
  cfg = ExperimentConfig(**{**SMALL, "rounds": 4}, workdir=str(tmp_path), method_args={
      "flash_mode": "jmwst", "flash_init_frac": 0.34, "flash_init_epochs": 2,
      "flash_update_interval": 2})
  exp = train.build_experiment(cfg)
  budget = 0.2 * sum(exp.algorithm.sizes(exp.init_state.params))

  def pruned(tree):
    return [np.asarray(m) for m in exp.algorithm.pruned_leaves(jax.device_get(tree))]

  state, masks = exp.init_state, [pruned(exp.init_state.algo_state.mask)]
  assert sum(int(m.sum()) for m in masks[0]) >= budget          # M0: ceil(d·n_l) per layer
  for t in range(1, 5):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    masks.append(pruned(state.algo_state.mask))
    mask_round = t in (1, 2, 4)
    assert len(m["clients"]) == (2 if t == 1 else 3)             # int(0.34·6) = 2, then K
    assert (np.asarray(m["uplink_mask_bits_per_client"]) > 0).all() == mask_round, t
    moved = any(not np.array_equal(a, b) for a, b in zip(masks[-2], masks[-1]))
    assert moved == mask_round, t
    total = sum(int(x.sum()) for x in masks[-1])
    assert total <= budget + 2 and (t > 1 or total >= budget), (t, total, budget)
    for w, mk in zip(pruned(state.params), masks[-1]):
      np.testing.assert_array_equal(w != 0, mk)                 # the model is its mask
  assert sorted(exp.round_step._steps) == [DST, FIXED, HUNT]


def _run_py(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_run_py_and_a_resume_across_the_stage_boundary_agree_bit_for_bit(tmp_path):
  args = {"flash_mode": "spdst", "flash_init_frac": 0.34, "flash_init_epochs": 2}
  flags = [f"--{k}={v}" for k, v in {**SMALL, **args, "rounds": 2}.items()
           if k not in ("progress", "tensorboard")]
  proc = _run_py(*flags, "--noprogress", "--notensorboard", f"--workdir={tmp_path / 'a'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.load(open(tmp_path / "a" / "config.json"))["method_args"] == {
      **args, "flash_prune_rate": 0.25, "flash_update_interval": 1, "flash_variant": "original"}
  cut = ExperimentConfig(**{**SMALL, "checkpoint_every": 1, "rounds": 2}, method_args=args,
                         workdir=str(tmp_path / "b"))
  train.run(cut, max_rounds=1)                     # stopped right after stage 1
  train.run(cut.replace(resume=True))
  rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"}
           for l in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
  assert rows[0] == rows[1] and [len(r["clients"]) for r in rows[0]] == [2, 3]
  assert all(r["global_density"] < 0.3 for r in rows[0])
  bad = _run_py("--algorithm=flash", "--sparsity=0.9", "--flash_init_frac=1.5",
                f"--workdir={tmp_path}/bad")
  lines = [l for l in bad.stderr.splitlines() if l.strip()]
  assert bad.returncode == 2 and len(lines) == 1, bad.stderr
  assert "flash_init_frac=1.5 must lie in (0, 1]" in lines[0]

"""PruneFL: the greedy readjustment against a numpy heap implementation of the authors' rule,
the squared-gradient accumulator and the initial pruning against plain jax.grad loops,
layer_flops time costs, extras on the uplink, streaming, resume across a readjustment."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import algorithms, models, train
from sparsefl_jax.algorithms import FedAvg
from sparsefl_jax.algorithms.base import Upload
from sparsefl_jax.algorithms.prunefl import (PruneFL, PruneFLState, layer_flops_time_cost,
                                             readjust_masks, uniform_time_cost)
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated import round as round_lib
from sparsefl_jax.federated.optimizers import client_optimizer
from sparsefl_jax.sparsity import masks as masks_lib

import test_sharding


def np_readjust(ws, sqs, masks, costs, other, d, kappa, max_keep):
  """numpy reference, written as the authors' `process_layer` + `architecture_search`: per
  layer keep all active but the floor(d·n) smallest |w|, then pop the best g²/t of the
  layers' descending candidate lists while it beats Δ/T (float64)."""
  num = float(other)
  den = kappa * sum(c * w.size for w, c in zip(ws, costs))
  kept, lists, total = [], [], 0
  for w, s, m, c in zip(ws, sqs, masks, costs):
    a, m, s = np.abs(w).ravel().astype(np.float64), np.ravel(m), np.ravel(s).astype(float)
    n = int(m.sum())
    drop = int(np.floor(np.float32(d) * np.float32(n)))
    thr = np.sort(a[m])[drop] if drop < n else np.inf
    k = m & (a >= thr)
    kept.append(k)
    num, den, total = num + s[k].sum(), den + c * k.sum(), total + int(k.sum())
    cand = np.flatnonzero(~k)
    lists.append(list(cand[np.argsort(-s[cand], kind="stable")]))
  while total < max_keep:
    best = None
    for l, cands in enumerate(lists):
      if cands:
        v = float(np.ravel(sqs[l])[cands[0]]) / costs[l]
        if best is None or v > best[0]:
          best = (v, l)
    if best is None or not best[0] > num / den:
      break
    j = lists[best[1]].pop(0)
    kept[best[1]][j] = True
    num += float(np.ravel(sqs[best[1]])[j])
    den += costs[best[1]]
    total += 1
  return [k.reshape(np.shape(w)) for k, w in zip(kept, ws)]


def _case(seed, pruned_frac):
  rng = np.random.default_rng(seed)
  shapes = {"a": (6, 4), "b": (4, 3)}
  masks = {l: rng.random(s) >= pruned_frac for l, s in shapes.items()}
  w = {l: np.where(masks[l], rng.normal(size=s), 0).astype(np.float32)
       for l, s in shapes.items()}
  sq = {l: rng.exponential(size=s).astype(np.float32) for l, s in shapes.items()}
  if pruned_frac:      # a pruned weight with by far the largest g²: it must come back
    j = np.flatnonzero(~masks["a"].ravel())[0]
    sq["a"].ravel()[j] = 50.0
  bias_sq = rng.exponential(size=(4,)).astype(np.float32)
  return w, sq, masks, bias_sq


@pytest.mark.parametrize("seed,pruned,d,kappa,costs,cap", [
    (0, 0.0, 0.3, 0.14, (1.0, 1.0), 36),       # dense start, uniform t_j, no cap
    (1, 0.4, 0.3, 0.14, (1.0, 1.0), 36),       # regrowth of a pruned weight
    (2, 0.4, 0.3, 2.0, (3.0, 0.5), 36),        # per-layer t_j, large c: adds more
    (3, 0.2, 0.0, 0.14, (1.0, 1.0), 36),       # d = 0: nothing active can leave
    (4, 0.0, 1.0, 1.0, (1.0, 2.0), 36),        # d = 1: every weight is a candidate
    (5, 0.0, 0.3, 5.0, (1.0, 1.0), 27),        # the cap binds
])
def test_readjustment_matches_the_numpy_heap_greedy(seed, pruned, d, kappa, costs, cap):
  w, sq, masks, bias_sq = _case(seed, pruned)
  params = {"a": {"kernel": jnp.asarray(w["a"]), "bias": jnp.zeros((4,))},
            "b": {"kernel": jnp.asarray(w["b"])}}
  sqt = {"a": {"kernel": jnp.asarray(sq["a"]), "bias": jnp.asarray(bias_sq)},
         "b": {"kernel": jnp.asarray(sq["b"])}}
  mask = {"a": {"kernel": jnp.asarray(masks["a"]), "bias": jnp.ones((4,), bool)},
          "b": {"kernel": jnp.asarray(masks["b"])}}
  cost = {"a": {"kernel": jnp.float32(costs[0]), "bias": jnp.float32(0)},
          "b": {"kernel": jnp.float32(costs[1])}}
  got = jax.jit(readjust_masks, static_argnums=(5, 6))(params, sqt, mask, cost, d, kappa, cap)
  want = np_readjust([w["a"], w["b"]], [sq["a"], sq["b"]], [masks["a"], masks["b"]],
                     list(costs), float(bias_sq.sum()), d, kappa, cap)
  np.testing.assert_array_equal(np.asarray(got["a"]["kernel"]), want[0])
  np.testing.assert_array_equal(np.asarray(got["b"]["kernel"]), want[1])
  assert np.asarray(got["a"]["bias"]).all()
  total = int(want[0].sum() + want[1].sum())
  assert total <= cap and 0 < total
  if pruned:
    j = np.flatnonzero(~masks["a"].ravel())[0]
    assert want[0].ravel()[j]                       # regrown
  if cap < 36:
    assert total == cap
  if d == 0.0:
    assert (want[0] >= masks["a"]).all() and (want[1] >= masks["b"]).all()


def test_schedule_phases_and_decay():
  algo = PruneFL(readjust_every=50, max_decrease=0.3, half_life=100)
  assert [t for t in range(1, 202) if algo.round_phase(t) == "readjust"] == [51, 101, 151,
                                                                             201]
  np.testing.assert_allclose(float(algo.decrease(51)), 0.3 * 0.5 ** 0.5, rtol=1e-6)
  assert float(algo.decrease(1)) == pytest.approx(0.3)
  params = {"fc": {"kernel": jnp.zeros((10, 10)), "bias": jnp.zeros((10,))}}
  assert PruneFL(sparsity=0.3).max_keep(params) == 70


def _mlp(num_classes=3, shape=(2, 2, 1)):
  model = models.get_model("mlp_small", num_classes)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)))["params"]
  return model, params


def _ce(model, p, x, y):
  logp = jax.nn.log_softmax(model.apply({"params": p}, x))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))


def test_squared_gradient_accumulator_matches_a_plain_grad_loop():
  """One client of 4 examples padded to 12, batch 4: one real step per epoch, two padded
  steps that must add nothing."""
  model, params = _mlp()
  rng = np.random.default_rng(1)
  mask = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) > 0.3) if p.ndim == 2
                      else jnp.ones(p.shape, bool), params)
  params = masks_lib.apply_masks(params, mask)
  x = jnp.asarray(rng.normal(size=(12, 2, 2, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(12,)), jnp.int32)
  algo = PruneFL().bind().for_phase("readjust")
  state = PruneFLState(mask, uniform_time_cost(params))
  cfg = client_lib.LocalConfig(epochs=3, batch_size=4, max_examples=12)
  res = client_lib.local_train(algo, model, lambda x, k, t: x, cfg,
                               lambda: client_optimizer(0.2), params, {}, state, x, y,
                               jnp.int32(4), jax.random.PRNGKey(5), jnp.int32(51))
  _, acc = res.client_state
  w, want = params, jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    g = jax.grad(lambda p: _ce(model, p, x[:4], y[:4]))(w)
    want = jax.tree.map(lambda a, gg: a + gg ** 2, want, g)
    w = jax.tree.map(lambda p, gg, m: jnp.where(m, p - 0.2 * gg, 0), w, g, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), acc, want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
               res.params, w)
  # Pruned weights have a gradient too (they may regrow); they stay 0 while training.
  k = np.asarray(acc["fc1"]["kernel"])[~np.asarray(mask["fc1"]["kernel"])]
  assert (k > 0).any()
  assert not np.asarray(res.params["fc1"]["kernel"])[~np.asarray(mask["fc1"]["kernel"])].any()
  # The upload carries Σ g² as extras: charged like the values (dense: 4 bytes an entry).
  upload = algo.client_upload(params, res.params, res.client_state, 51)
  n = sum(p.size for p in jax.tree.leaves(params))
  cost = round_lib.uplink_cost(upload, {}, "dense")
  assert int(cost["bytes"]) == 4 * 2 * n
  assert int(round_lib.uplink_cost(Upload(upload.values), {}, "dense")["bytes"]) == 4 * n


def test_initial_pruning_matches_a_plain_grad_loop_and_the_numpy_rule():
  model, params = _mlp()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(8, 2, 2, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(8,)), jnp.int32)
  loss = lambda p: _ce(model, p, x, y)
  algo = PruneFL(sparsity=0.2, init_rounds=3, init_steps=4, init_lr=0.5, max_decrease=0.3)
  got, state = jax.jit(lambda p: algo.init_from_data(p, algo.init_state(p), loss, None))(
      params)
  w = jax.tree.map(np.asarray, params)
  mask = jax.tree.map(lambda p: np.ones(p.shape, bool), w)
  n = sum(p["kernel"].size for p in w.values())
  for _ in range(3):
    acc = jax.tree.map(np.zeros_like, w)
    for _ in range(4):
      g = jax.tree.map(np.asarray, jax.grad(loss)(w))
      acc = jax.tree.map(lambda a, gg: a + gg.astype(np.float64) ** 2, acc, g)
      w = jax.tree.map(lambda p, gg, m: np.where(m, p - np.float32(0.5) * gg, 0), w, g, mask)
    layers = sorted(w)
    new = np_readjust([w[l]["kernel"] for l in layers], [acc[l]["kernel"] for l in layers],
                      [mask[l]["kernel"] for l in layers], [1.0] * len(layers),
                      sum(float(acc[l]["bias"].sum()) for l in layers), 0.3, 0.14,
                      int(np.ceil(0.8 * n)))
    for l, k in zip(layers, new):
      mask[l]["kernel"] = k
    w = jax.tree.map(lambda p, m: np.where(m, p, 0), w, mask)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.mask), mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.tree.map(np.asarray, got), w)
  density = sum(int(mask[l]["kernel"].sum()) for l in mask) / n
  assert 0.2 < density < 1.0


@pytest.mark.parametrize("conv_impl", ["im2col", "lax"])
def test_layer_flops_counts_multiply_accumulates_per_weight(conv_impl):
  model = models.get_model("small_cnn", 4, conv_impl=conv_impl)
  x = jnp.zeros((3, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  cost = layer_flops_time_cost(params, lambda p: jnp.sum(model.apply({"params": p}, x)))
  # SAME 3x3 convs: conv1 on 8x8, conv2 on 4x4 (after a 2x2 pool); dense: once per example.
  want = {"conv1": 3 * 64, "conv2": 3 * 16, "fc1": 3, "fc2": 3}
  for layer, macs in want.items():
    assert float(cost[layer]["kernel"]) == macs, layer
    assert float(cost[layer]["bias"]) == 0.0


SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
             synthetic_classes=4, synthetic_examples=12, synthetic_test=20, num_clients=3,
             clients_per_round=3, batch_size=6, lr=0.1, rounds=3, progress=False,
             tensorboard=False, checkpoint_every=0, eval_every=0, algorithm="prunefl",
             sparsity=0.3, comm_encoding="dense",
             method_args={"prunefl_readjust_every": 1, "prunefl_init_rounds": 2,
                          "prunefl_init_steps": 3})


def test_library_run_readjusts_in_its_rounds_and_charges_the_squared_gradients(tmp_path):
  exp = train.build_experiment(ExperimentConfig(**SMALL, workdir=str(tmp_path)))
  state = exp.init_state
  n = sum(p.size for p in jax.tree.leaves(state.params))
  masks, ups = [host(state.algo_state.mask)], []
  for t in (1, 2, 3):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    masks.append(host(state.algo_state.mask))
    ups.append(np.asarray(m["uplink_bytes_per_client"]))
    jax.tree.map(lambda p, k: np.testing.assert_array_equal(np.asarray(p)[~k], 0),
                 host(state.params), masks[-1])
  assert exp.algorithm.round_phase(1) == "train" and sorted(exp.round_step._steps) == [
      "readjust", "train"]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                 jax.tree.leaves(b)))
  assert same(masks[0], masks[1])                                   # round 1 only trains
  assert not same(masks[1], masks[2]) or not same(masks[2], masks[3])
  # Readjustment rounds upload Σ g² of every parameter besides the values: 4 B each, dense.
  np.testing.assert_array_equal(ups[1] - ups[0], 4 * n)
  np.testing.assert_array_equal(ups[2], ups[1])
  kernels = [k for k in jax.tree.leaves(masks[0]) if k.ndim == 2]
  assert sum(k.sum() for k in kernels) < sum(k.size for k in kernels)   # initial pruning


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_resume_across_a_readjustment_is_bit_identical(tmp_path):
  cfg = ExperimentConfig(**{**SMALL, "checkpoint_every": 1, "rounds": 2, "method_args": {
      "prunefl_readjust_every": 1, "prunefl_init_rounds": 0}}, workdir=str(tmp_path / "a"))
  train.run(cfg)
  cut = cfg.replace(workdir=str(tmp_path / "b"))
  train.run(cut, max_rounds=1)
  train.run(cut.replace(resume=True))            # round 2 readjusts
  rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"}
           for l in open(os.path.join(c.workdir, "metrics.jsonl"))] for c in (cfg, cut)]
  assert rows[0] == rows[1] and len(rows[0]) == 2
  assert rows[0][1]["uplink_bytes"] > rows[0][0]["uplink_bytes"]   # the readjustment round
  assert PruneFL.rounds_fixed_for(cfg) is None   # nothing depends on --rounds: it may grow


def test_streamed_aggregate_equals_stacked():
  algo = PruneFL(sparsity=0.3, readjust_every=1).bind().for_phase("readjust")
  streamed = test_sharding.run_rounds(algo, "map", 1, stream=True, rounds=2)
  stacked = test_sharding.run_rounds(algo, "vmap", 1, rounds=2)
  test_sharding.assert_same(streamed, stacked)
  np.testing.assert_array_equal(np.asarray(streamed[0].algo_state.mask["fc"]["kernel"]),
                                np.asarray(stacked[0].algo_state.mask["fc"]["kernel"]))
  assert not np.asarray(streamed[0].algo_state.mask["fc"]["kernel"]).all()


def test_finalize_state_cannot_be_combined_with_an_own_aggregate():
  class Both(FedAvg):
    def aggregate(self, *args):
      return FedAvg.aggregate(self, *args)

    def finalize_state(self, *args):
      return args[4]
  with pytest.raises(ValueError, match="overrides both `aggregate` and `finalize_state`"):
    round_lib.build_round_step(Both().bind(), None, None, None, None)


@pytest.mark.parametrize("args,message", [
    ({"prunefl_time_constant": 0.0}, "prunefl_time_constant=0.0 must be > 0"),
    ({"prunefl_max_decrease": 1.5}, "prunefl_max_decrease=1.5 must lie in [0, 1]"),
    ({"prunefl_readjust_every": 0}, "prunefl_readjust_every=0 must be >= 1"),
    ({"prunefl_time_cost": "measured"}, "prunefl_time_cost='measured' is not one of"),
])
def test_bad_settings_are_one_line(args, message):
  cfg = ExperimentConfig(**{**SMALL, "method_args": args}, workdir="/tmp/p")
  with pytest.raises(ConfigError) as e:
    algorithms.get_algorithm("prunefl", cfg.validate())
  assert message in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"prunefl_init_steps=0 must be >= 1"):
    PruneFL(init_steps=0)

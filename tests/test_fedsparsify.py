"""FedSparsify Global/Local: schedule in the round, majority vote, masked training, no regrowth."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsefl_jax import ExperimentConfig, comm, models, train
from sparsefl_jax.algorithms import get_algorithm
from sparsefl_jax.algorithms.base import Upload
from sparsefl_jax.algorithms.fedsparsify import (FedSparsifyGlobal, FedSparsifyLocal,
                                                 SparsifyState)
from sparsefl_jax.config import ConfigError
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated.optimizers import ClientLRSchedule, server_optimizer
from sparsefl_jax.federated.round import (RoundConfig, build_round_step, init_server_state,
                                          jit_round_step)
from sparsefl_jax.federated.state import ClientData
from sparsefl_jax.metrics import read_metrics
from sparsefl_jax.sparsity import PolynomialSchedule
from sparsefl_jax.sparsity import masks as masks_lib

P, M, D, C = 6, 16, 10, 3   # clients, examples per client, features, classes
SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
             synthetic_classes=4, synthetic_examples=24, synthetic_test=40, num_clients=4,
             clients_per_round=4, batch_size=8, local_epochs=2, lr=0.2, momentum=0.5,
             progress=False, eval_every=0)


# ---- helpers ---------------------------------------------------------------------------
def make_data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(P, M, D)).astype(np.float32)
  y = rng.integers(0, C, size=(P, M)).astype(np.int32)
  return ClientData.from_arrays(x, y, np.full((P,), M, np.int32))


def batch_fn(x, key, train):
  del key, train
  return x.astype(jnp.float32)


MODEL = models.get_model("mlp_small", C)


def init_params(seed=1):
  return MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, D)))["params"]


def make_round(algorithm, k=P, momentum=0.9, wd=1e-3, server=None, epochs=2):
  cfg = RoundConfig(num_clients=P, clients_per_round=k,
                    local=client_lib.LocalConfig(epochs, 4, M), lr_schedule=ClientLRSchedule(0.1),
                    momentum=momentum, weight_decay=wd, comm_encoding="dense")
  step = jit_round_step(build_round_step(algorithm, MODEL, batch_fn, cfg, server), donate=False)
  state = init_server_state(algorithm, init_params(), {}, server, jax.random.PRNGKey(7))
  return step, state


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def is_subset(small, big):
  return all(np.all(~s | b) for s, b in zip(leaves(small), leaves(big)))


def num_params(tree):
  return sum(x.size for x in leaves(tree))


def run(tmp_path, name, **kw):
  cfg = ExperimentConfig(**{**SMALL, **kw}, workdir=str(tmp_path / name))
  train.run(cfg)
  return cfg, read_metrics(os.path.join(cfg.workdir, "metrics.jsonl"))


# ---- construction ----------------------------------------------------------------------
def test_from_config_reads_schedule_and_vote():
  cfg = ExperimentConfig(algorithm="fedsparsify_local", rounds=50, sparsity=0.95,
                         initial_sparsity=0.1, prune_start_round=3, prune_frequency=2,
                         prune_exponent=2, prune_scope="layer", vote_threshold=3)
  algo = get_algorithm("fedsparsify_local", cfg)
  assert isinstance(algo, FedSparsifyLocal) and algo.per_layer and algo.vote_threshold == 3
  assert algo.schedule == PolynomialSchedule(0.95, 50, initial_sparsity=0.1, start_round=3,
                                             frequency=2, exponent=2)
  glob = get_algorithm("fedsparsify_global", cfg.replace(algorithm="fedsparsify_global"))
  assert isinstance(glob, FedSparsifyGlobal) and glob.name == "fedsparsify_global"


@pytest.mark.parametrize("algo, changes, needle", [
    ("fedsparsify_local", dict(server_optimizer="adam"), "server_optimizer='adam'"),
    ("fedsparsify_local", dict(vote_threshold=11), "vote_threshold=11"),
    ("fedsparsify_global", dict(rounds=1), "rounds=1"),
    ("fedsparsify_global", dict(topk_method="top_k"), "topk_method='top_k'"),
])
def test_bad_settings_are_rejected(algo, changes, needle):
  cfg = ExperimentConfig(algorithm=algo, rounds=10, clients_per_round=10).replace(**changes)
  with pytest.raises(ConfigError, match=needle):
    get_algorithm(algo, cfg)


# ---- schedule integration ----------------------------------------------------------------
# Eq. 1 by hand: s_t = s_T·(1 − (1 − (t_F − t_0)/(T − t_0))^3), t_F = F·floor(t/F).
HAND_T6_F1 = [0.0, 0.9 * (1 - 0.8**3), 0.9 * (1 - 0.6**3), 0.9 * (1 - 0.4**3),
              0.9 * (1 - 0.2**3), 0.9]                      # s_T=.9, T=6, t_0=1, F=1
HAND_T6_F2 = [0.0, 0.8 * (1 - (2 / 3)**3), 0.8 * (1 - (2 / 3)**3), 0.8 * (1 - (1 / 3)**3),
              0.8 * (1 - (1 / 3)**3), 0.8]                  # s_T=.8, T=6, t_0=0, F=2


@pytest.mark.parametrize("kw, table", [
    (dict(sparsity=0.9, prune_start_round=1, prune_frequency=1), HAND_T6_F1),
    (dict(sparsity=0.8, prune_start_round=0, prune_frequency=2), HAND_T6_F2),
])
def test_global_density_follows_schedule(tmp_path, kw, table):
  _, rows = run(tmp_path, "g", algorithm="fedsparsify_global", rounds=6, **kw)
  n = 36 * 32 + 32 + 32 * 4 + 4
  for row, s in zip(rows, table):
    assert abs(row["nnz_params"] - (1 - s) * n) <= 1, (row["round"], row["nnz_params"], s)
    assert abs(row["global_density"] - (1 - s)) <= 1 / n
    assert row["target_sparsity"] == pytest.approx(s, abs=1e-6)
  # The final model sits at s_T, and evaluation sees the pruned model.
  assert abs(rows[-1]["global_density"] - (1 - kw["sparsity"])) <= 1 / n
  assert "test_accuracy" in rows[-1]


def test_global_per_layer_scope_prunes_every_tensor():
  params = init_params()
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
  algo = FedSparsifyGlobal(schedule=PolynomialSchedule(0.75, 2, start_round=1), per_layer=True)
  pruned, state = jax.jit(algo.server_post)(params, algo.init_state(params), jnp.int32(2))
  for p, m in zip(leaves(pruned), leaves(state.mask)):
    assert abs(np.count_nonzero(p) - 0.25 * p.size) <= 1
    np.testing.assert_array_equal(p != 0, m)


def test_global_skips_pruning_off_schedule():
  params = init_params()
  algo = FedSparsifyGlobal(schedule=PolynomialSchedule(0.9, 10, start_round=2, frequency=3))
  state = algo.init_state(params)
  post = jax.jit(algo.server_post)
  for t in (1, 2, 4, 5):   # t <= t_0, or F does not divide t
    out, new = post(params, state, jnp.int32(t))
    assert all(np.all(m) for m in leaves(new.mask)) and float(new.sparsity) == 0.0
    for a, b in zip(leaves(out), leaves(params)):
      np.testing.assert_array_equal(a, b)


# ---- majority vote --------------------------------------------------------------------------
def _random_uploads(k, seed):
  rng = np.random.default_rng(seed)
  shapes = {"a": (5, 7), "b": (9,)}
  masks = {n: rng.random((k,) + s) < 0.5 for n, s in shapes.items()}
  values = {n: np.where(masks[n], rng.normal(size=masks[n].shape), 0.0).astype(np.float32)
            for n in shapes}
  weights = rng.integers(1, 20, size=k).astype(np.float32)
  return values, masks, weights


def _numpy_vote(values, masks, weights, thr, global_mask):
  w = weights.astype(np.float64) / weights.sum()
  out = {}
  for n in values:
    avg = np.tensordot(w, values[n].astype(np.float64), 1)   # zeros of pruning clients count
    keep = (masks[n].sum(0) >= thr) & global_mask[n]
    out[n] = np.where(keep, avg, 0.0)
  return out


@pytest.mark.parametrize("k, threshold, expected_thr", [
    (3, -1, 1), (4, -1, 2), (5, -1, 2), (10, -1, 5), (3, 2, 2), (4, 3, 3)])
def test_majority_vote_merge_matches_numpy(k, threshold, expected_thr):
  values, masks, weights = _random_uploads(k, seed=k + threshold)
  rng = np.random.default_rng(0)
  global_mask = {n: rng.random(v.shape[1:]) < 0.9 for n, v in values.items()}
  algo = FedSparsifyLocal(vote_threshold=threshold)
  assert algo.threshold(k) == expected_thr
  state = SparsifyState(jax.tree.map(jnp.asarray, global_mask), jnp.float32(0.5))
  got = algo.aggregate(None, Upload(values, masks), jnp.asarray(weights), state, jnp.int32(2))
  want = _numpy_vote(values, masks, weights, expected_thr, global_mask)
  for n in values:
    np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_vote_threshold_one_is_union_and_k_is_intersection():
  k = 4
  values, masks, weights = _random_uploads(k, seed=1)
  ones = jax.tree.map(lambda v: jnp.ones(v.shape[1:], bool), values)
  state = SparsifyState(ones, jnp.float32(0.5))
  for thr, combine in ((1, np.any), (k, np.all)):
    got = FedSparsifyLocal(vote_threshold=thr).aggregate(
        None, Upload(values, masks), jnp.asarray(weights), state, jnp.int32(2))
    for n in values:
      np.testing.assert_array_equal(np.asarray(got[n]) != 0, combine(masks[n], axis=0))


def test_local_round_vote_threshold_orders_densities():
  """One pruning round: union (1 vote) ⊇ floor(K/2) votes ⊇ intersection (K votes)."""
  data, key = make_data(), jax.random.PRNGKey(11)
  schedule = PolynomialSchedule(0.8, 2, start_round=0)      # round 1 prunes to 0.7
  s1 = float(schedule(1))
  out = {}
  for thr in (1, -1, P):
    step, state = make_round(FedSparsifyLocal(schedule=schedule, vote_threshold=thr))
    new, metrics = step(state, data, key)
    out[thr] = new
    assert float(metrics["local_density"]) == pytest.approx(1 - s1, abs=1 / num_params(
        new.params))
  assert is_subset(out[P].algo_state.mask, out[-1].algo_state.mask)
  assert is_subset(out[-1].algo_state.mask, out[1].algo_state.mask)
  dens = {t: float(masks_lib.density(s.params)) for t, s in out.items()}
  assert dens[1] >= 1 - s1 >= dens[P]
  assert dens[1] > dens[-1] > dens[P]


# ---- masked training and no regrowth --------------------------------------------------------
def test_masked_step_keeps_weights_and_momentum_zero():
  """transform_grads + post_step with a fresh momentum optimizer: pruned entries stay 0."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), init_params())
  algo = FedSparsifyGlobal(schedule=PolynomialSchedule(0.6, 2))
  mask = algo.prune_masks(params, 0.6)
  params = masks_lib.apply_masks(params, mask)
  opt = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))
  opt_state = opt.init(params)
  for _ in range(5):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    grads = algo.transform_grads(grads, params, mask)
    updates, opt_state = opt.update(grads, opt_state, params)
    params, opt_state, mask = algo.post_step(optax.apply_updates(params, updates), opt_state,
                                             mask)
  trace = opt_state[1][0].trace
  off = jax.tree.map(jnp.logical_not, mask)
  for tree in (params, trace):
    assert all(np.all(x[o] == 0) for x, o in zip(leaves(tree), leaves(off)))
  assert all(np.any(x[m] != 0) for x, m in zip(leaves(trace), leaves(mask)))


def test_local_training_stays_inside_global_mask():
  data = make_data()
  algo = FedSparsifyLocal(schedule=PolynomialSchedule(0.9, 4, start_round=0))
  params = masks_lib.magnitude_prune(jax.tree.map(lambda p: p + 0.3, init_params()), 0.5)
  state = SparsifyState(masks_lib.mask_of(params), jnp.float32(0.5))
  cfg = client_lib.LocalConfig(3, 4, M)
  make_opt = lambda: optax.sgd(0.1, momentum=0.9)
  res = client_lib.local_train(algo, MODEL, batch_fn, cfg, make_opt, params, {}, state,
                               data.x[0], data.y[0], data.counts[0], jax.random.PRNGKey(0),
                               jnp.int32(2))
  assert is_subset(masks_lib.mask_of(res.params), state.mask)
  changed = [np.any(a != b) for a, b in zip(leaves(res.params), leaves(params))]
  assert all(changed)
  upload = algo.client_upload(params, res.params, res.client_state, jnp.int32(2))
  assert is_subset(upload.mask, state.mask)
  np.testing.assert_array_equal(
      np.concatenate([m.ravel() for m in leaves(upload.mask)]),
      np.concatenate([v.ravel() != 0 for v in leaves(upload.values)]))
  assert abs(int(masks_lib.nnz(upload.values)) - (1 - float(algo.schedule(2))) *
             num_params(params)) <= 1


@pytest.mark.parametrize("algo, server", [
    (FedSparsifyGlobal(schedule=PolynomialSchedule(0.9, 5, start_round=0)), None),
    (FedSparsifyGlobal(schedule=PolynomialSchedule(0.9, 5, start_round=0)),
     server_optimizer("adam", 0.05)),
    (FedSparsifyLocal(schedule=PolynomialSchedule(0.9, 5, start_round=0)), None),
], ids=["global", "global_fedadam", "local"])
def test_no_regrowth_through_rounds(algo, server):
  """Local SGD with momentum and weight decay, aggregation and the server step never revive
  a pruned weight; the mask is exactly the model's non-zero pattern from the first prune on."""
  data = make_data()
  step, state = make_round(algo, k=4, server=server)
  prev_mask = state.algo_state.mask
  for t in range(1, 6):
    state, _ = step(state, data, jax.random.PRNGKey(t))
    mask = state.algo_state.mask
    assert is_subset(mask, prev_mask), t
    assert is_subset(masks_lib.mask_of(state.params), mask), t
    prev_mask = mask
  for p, m in zip(leaves(state.params), leaves(mask)):
    np.testing.assert_array_equal(p != 0, m)
  if isinstance(algo, FedSparsifyGlobal):   # Global lands on s_T = 0.9 at T = 5
    assert abs(float(masks_lib.density(state.params)) - 0.1) <= 1 / num_params(state.params)


# ---- communication --------------------------------------------------------------------------
def test_local_uploads_include_mask_bits():
  data, key = make_data(), jax.random.PRNGKey(5)
  schedule = PolynomialSchedule(0.5, 3, start_round=0)
  step_l, state_l = make_round(FedSparsifyLocal(schedule=schedule), k=3)
  _, m_local = step_l(state_l, data, key)
  step_g, state_g = make_round(FedSparsifyGlobal(schedule=schedule), k=3)
  _, m_global = step_g(state_g, data, key)
  params = init_params()
  mask_bytes = sum(comm.encoded_bytes(0, x.size, "bitmask") for x in leaves(params))
  n = num_params(params)
  np.testing.assert_array_equal(m_local["uplink_mask_bits_per_client"], [n] * 3)
  np.testing.assert_array_equal(m_global["uplink_mask_bits_per_client"], [0] * 3)
  # Dense value encoding: Local = the same 4 bytes per entry plus ceil(size/8) per tensor.
  np.testing.assert_array_equal(m_local["uplink_bytes_per_client"], [4 * n + mask_bytes] * 3)
  np.testing.assert_array_equal(m_global["uplink_bytes_per_client"], [4 * n] * 3)
  # The uploaded values are the locally pruned models.
  assert np.all(np.abs(np.asarray(m_local["uplink_nnz_per_client"]) -
                       (1 - float(schedule(1))) * n) <= 1)


def test_local_run_cost_and_resume(tmp_path):
  """The metrics stream counts one N-bit mask per client in the rounds where clients prune
  (rounds > t_0 = 1); resuming the mask state is exact."""
  kw = dict(algorithm="fedsparsify_local", rounds=4, sparsity=0.8, checkpoint_every=2)
  cfg, full = run(tmp_path, "a", **kw)
  n, k = 36 * 32 + 32 + 32 * 4 + 4, cfg.clients_per_round
  for r in full:
    masks = k * n if r["round"] > cfg.prune_start_round else 0
    assert r["fedsparsify_cost_mbits"] == pytest.approx((32 * r["transmitted_params"] + masks)
                                                        / 1e6)
    assert r["transmitted_params"] == r["uplink_nnz"] + r["downlink_nnz"]
  assert full[-1]["nnz_params"] < 0.5 * n
  split = cfg.replace(workdir=str(tmp_path / "b"))
  train.run(split, max_rounds=2)
  train.run(split.replace(resume=True))
  rows = read_metrics(os.path.join(split.workdir, "metrics.jsonl"))
  strip = lambda rs: [{key: v for key, v in r.items() if key != "seconds"} for r in rs]
  assert strip(full) == strip(rows)

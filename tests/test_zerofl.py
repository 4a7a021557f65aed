"""ZeroFL's uplink strategies and aggregation against numpy; byte counts; end-to-end runs."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import ExperimentConfig, comm, models, train
from sparsefl_jax.algorithms.base import Upload
from sparsefl_jax.algorithms.zerofl import SwatFL, ZeroFL
from sparsefl_jax.federated import client as client_lib
from sparsefl_jax.federated.optimizers import ClientLRSchedule
from sparsefl_jax.metrics import read_metrics
from sparsefl_jax.models import introspect

ORDER = ("fc1", "fc2")   # fc1 is SWAT-sparse; fc2 (the classifier) stays dense


def _tree(rng):
  return {"fc1": {"kernel": rng.normal(size=(8, 6)).astype(np.float32),
                  "bias": rng.normal(size=(6,)).astype(np.float32)},
          "fc2": {"kernel": rng.normal(size=(6, 3)).astype(np.float32),
                  "bias": rng.normal(size=(3,)).astype(np.float32)}}


def _np_layer_topk_mask(scores, rho):
  k = int(np.ceil(rho * scores.size))
  thr = np.sort(np.abs(scores).ravel())[::-1][k - 1]
  return np.abs(scores) >= thr


def _np_round(strategy, global_p, locals_, weights, rho):
  w = np.asarray(weights, np.float64) / np.sum(weights)
  sent = []
  for local in locals_:
    s = {}
    for layer in ("fc1", "fc2"):
      for name in ("kernel", "bias"):
        wl, wg = local[layer][name], global_p[layer][name]
        d = wl - wg
        if layer != "fc1" or name != "kernel" or strategy == "dense":
          s[(layer, name)] = wl if strategy in ("topk_weights", "dense") else d
          continue
        if strategy == "topk_weights":
          s[(layer, name)] = wl * _np_layer_topk_mask(wl, rho)
        elif strategy == "diff_on_topk_weights":
          s[(layer, name)] = d * _np_layer_topk_mask(wl, rho)
        else:
          s[(layer, name)] = d * _np_layer_topk_mask(d, rho)
    sent.append(s)
  out = {}
  for key in sent[0]:
    mean = sum(wi * si[key] for wi, si in zip(w, sent))
    out[key] = mean if strategy in ("topk_weights", "dense") else global_p[key[0]][key[1]] + mean
  return out


@pytest.mark.parametrize("strategy", ["topk_weights", "diff_on_topk_weights",
                                      "topk_weights_diff", "dense"])
def test_uplink_and_aggregation_match_numpy(strategy):
  rng = np.random.default_rng(0)
  global_p = _tree(rng)
  locals_ = [_tree(rng) for _ in range(3)]
  weights = np.array([3.0, 5.0, 2.0], np.float32)
  alg, op = ZeroFL(sparsity=0.9, mask_ratio=0.1, strategy=strategy).setup(global_p, ORDER)
  assert [n for n, _ in op.densities] == ["fc1"]
  uploads = [alg.client_upload(global_p, l, (), jnp.int32(1)) for l in locals_]
  stacked = Upload(jax.tree.map(lambda *xs: jnp.stack(xs), *[u.values for u in uploads]))
  agg = alg.aggregate(global_p, stacked, jnp.asarray(weights), (), jnp.int32(1))
  want = _np_round(strategy, global_p, locals_, weights, rho=0.2)
  for (layer, name), value in want.items():
    np.testing.assert_allclose(agg[layer][name], value, rtol=1e-5, atol=1e-6)
  if strategy != "dense":
    nnz = int(jnp.sum(uploads[0].values["fc1"]["kernel"] != 0))
    assert nnz == int(np.ceil(0.2 * 48))                 # ρ = 1 − sp + r_mask, per layer
    assert int(jnp.sum(uploads[0].values["fc2"]["kernel"] != 0)) == 18   # dense layer


def test_resnet18_csr_upload_matches_zerofl_paper():
  """sp = 0.95, r_mask = 0: ZeroFL reports 5.9 MB per client upload (dense 43.7 MB)."""
  model = models.get_model("resnet18", 10)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  order = introspect.weight_layer_order(model, shapes, x)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 200))
  params = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), shapes["params"])
  alg, _ = ZeroFL(sparsity=0.95, mask_ratio=0.0).setup(params, order)
  upload = jax.jit(lambda p: alg.client_upload(p, p, (), jnp.int32(1)))(params)
  mb = int(comm.tree_bytes(upload.values, "csr")) / 1e6
  assert abs(mb - 5.9) / 5.9 < 0.03, mb
  assert int(comm.tree_bytes(params, "dense")) / 1e6 == pytest.approx(44.7, rel=0.01)


SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=24, synthetic_test=40, num_clients=4,
             clients_per_round=2, batch_size=8, lr=0.1, rounds=2, progress=False,
             comm_encoding="csr", sparsity=0.9)


def test_zerofl_run_reports_sparse_upload_and_mask_metrics(tmp_path):
  cfg = ExperimentConfig(**SMALL, algorithm="zerofl", mask_ratio=0.1, uplink="topk_weights",
                         topk_period=3, workdir=str(tmp_path / "z"))
  train.run(cfg)
  rows = read_metrics(os.path.join(cfg.workdir, "metrics.jsonl"))
  dense_cfg = cfg.replace(algorithm="swat", workdir=str(tmp_path / "s"))
  train.run(dense_cfg)
  dense_rows = read_metrics(os.path.join(dense_cfg.workdir, "metrics.jsonl"))
  assert rows[-1]["uplink_bytes"] < 0.6 * dense_rows[-1]["uplink_bytes"]
  assert 0.0 < rows[-1]["upload_density"] < 0.6
  assert 0.0 <= rows[-1]["mask_iou"] <= 1.0
  assert any(k.startswith("density/") for k in rows[-1])
  assert np.isfinite(rows[-1]["test_accuracy"])


def test_mask_ratio_equal_to_sparsity_is_vanilla_swat(tmp_path):
  base = ExperimentConfig(**SMALL, workdir=str(tmp_path / "a"))
  zero = base.replace(algorithm="zerofl", uplink="topk_weights", mask_ratio=0.9)
  swat_cfg = base.replace(algorithm="swat", workdir=str(tmp_path / "b"))
  exp_z, exp_s = train.build_experiment(zero), train.build_experiment(swat_cfg)
  sz, _ = exp_z.round_step(exp_z.init_state, exp_z.client_data, exp_z.train_key)
  ss, _ = exp_s.round_step(exp_s.init_state, exp_s.client_data, exp_s.train_key)
  for a, b in zip(jax.tree.leaves(sz.params), jax.tree.leaves(ss.params)):
    np.testing.assert_array_equal(a, b)


def test_bad_zerofl_settings_are_rejected():
  with pytest.raises(ValueError, match="uplink='topk'"):
    ZeroFL(strategy="topk")
  with pytest.raises(ValueError, match="mask_ratio=0.5"):
    ZeroFL(sparsity=0.3, mask_ratio=0.5)
  assert SwatFL().strategy == "dense" and SwatFL().uplink == "weights"


class _PerStepSwat(SwatFL):
  """Reference: every client computes every threshold itself, every step (no cache, no
  shared step-0 thresholds)."""

  def _caches(self):
    return False


class _WrongContextSwat(SwatFL):
  """Hands clients a step-0 weight threshold of +inf: if it is used, step 0 drops every
  weight of the sparse layers."""

  def client_context(self, global_params, algo_state, t):
    ctx = super().client_context(global_params, algo_state, t)
    return jax.tree.map(lambda v: jnp.full_like(v, jnp.inf), ctx)


def _round_with(algorithm_cls, cfg):
  from sparsefl_jax.data import preprocess
  from sparsefl_jax.federated import round as round_lib
  exp = train.build_experiment(cfg)
  alg = algorithm_cls(**{f.name: getattr(exp.algorithm, f.name)
                         for f in dataclasses.fields(exp.algorithm)})
  local_cfg = round_lib.RoundConfig(
      num_clients=exp.client_data.num_clients, clients_per_round=cfg.clients_per_round,
      local=client_lib.LocalConfig(cfg.local_epochs, cfg.batch_size,
                                   exp.client_data.max_examples),
      lr_schedule=ClientLRSchedule(cfg.lr), client_map=cfg.client_map)
  step = jax.jit(round_lib.build_round_step(alg, exp.model, preprocess.make_batch_fn(
      exp.dataset), local_cfg, None))
  state, _ = step(exp.init_state, exp.client_data, exp.train_key)
  return state.params


@pytest.mark.parametrize("client_map", ["vmap", "map"])
def test_shared_step0_thresholds_equal_per_client_thresholds(tmp_path, client_map):
  """SWAT's step-0 weight thresholds, computed once per round in `client_context`, give
  bit-identical training to every client computing them itself each step."""
  cfg = ExperimentConfig(**SMALL, algorithm="swat", topk_period=1, client_map=client_map,
                         workdir=str(tmp_path))
  shared, per_step = _round_with(SwatFL, cfg), _round_with(_PerStepSwat, cfg)
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(per_step)):
    np.testing.assert_array_equal(a, b)
  wrong = _round_with(_WrongContextSwat, cfg.replace(topk_period=3))
  right = _round_with(SwatFL, cfg.replace(topk_period=3))
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(wrong), jax.tree.leaves(right)))


def test_topk_period_default_follows_swat():
  """0 (the default) = SWAT's CIFAR configs: every 10 steps for unstructured masks; block
  masks have no cache and refresh every step. Negative periods are refused."""
  assert ZeroFL().topk_period == 10
  assert SwatFL(structure="block").topk_period == 1
  assert ZeroFL(topk_period=3).topk_period == 3
  with pytest.raises(ValueError, match="topk_period=-1"):
    ZeroFL(topk_period=-1)
  cfg = ExperimentConfig(**SMALL, algorithm="swat", workdir="/tmp/unused")
  assert cfg.topk_period == 0
  assert SwatFL.from_config(cfg).topk_period == 10

"""SparsyFed: Powerprop, activation-pruning VJP, global top-K, spectral exponent, metrics."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsefl_jax import ExperimentConfig, metrics, train, tree_paths
from sparsefl_jax.config import ConfigError
from sparsefl_jax.data import preprocess
from sparsefl_jax.federated.client import LocalStep
from sparsefl_jax.algorithms.topk import TopK
from sparsefl_jax.metrics import read_metrics
from sparsefl_jax.models import layers
from sparsefl_jax.sparsity import masks, powerprop, swat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Wrap(nn.Module):
  op: object

  @nn.compact
  def __call__(self, x):
    return layers.Dense(5, use_bias=False, op=self.op, name="layer")(x)


def test_powerprop_reparam_gradient_and_init():
  v = jnp.array([0.0, 0.5, -2.0, 1e-3, -0.0])
  beta = 1.25
  np.testing.assert_allclose(powerprop.reparam(v, beta),
                             np.sign(v) * np.abs(v) ** beta, rtol=1e-6)
  g = jax.grad(lambda v: jnp.sum(powerprop.reparam(v, beta) * jnp.arange(1.0, 6.0)))(v)
  np.testing.assert_allclose(g, beta * np.abs(v) ** (beta - 1) * np.arange(1.0, 6.0),
                             rtol=1e-5)
  assert g[0] == 0.0 and g[4] == 0.0 and np.all(np.isfinite(g))   # zero v: zero gradient
  u = jnp.array([0.3, -1.7, 0.0, 2.5])
  np.testing.assert_allclose(powerprop.reparam(powerprop.inverse_reparam(u, beta), beta), u,
                             rtol=1e-5)


def test_activation_pruning_vjp_matches_independent_masked_vjp():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 12)).astype(np.float32)
  v = rng.normal(size=(12, 5)).astype(np.float32)
  v[rng.random(v.shape) < 0.6] = 0.0               # the layer is 60%-ish sparse
  g = rng.normal(size=(7, 5)).astype(np.float32)
  beta = 1.5
  model = Wrap(powerprop.PowerpropOp(beta, act_pruning=True, method="sort"))
  f = lambda x, v: model.apply({"params": {"layer": {"kernel": v}}}, x)
  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(v))
  gx, gv = vjp(jnp.asarray(g))
  # Independent reference: w, the layer density, the pruned input, then plain linear algebra.
  w = np.sign(v) * np.abs(v) ** beta
  density = 1.0 - np.mean(w == 0)
  k = int(np.ceil(density * x.size))
  thr = np.sort(np.abs(x).ravel())[::-1][k - 1]
  xs = np.where(np.abs(x) >= thr, x, 0.0)
  np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)          # forward: dense input
  np.testing.assert_allclose(gx, g @ w.T, rtol=1e-5, atol=1e-5)
  gw = xs.T @ g
  np.testing.assert_allclose(gv, gw * beta * np.abs(v) ** (beta - 1), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(gv)[v == 0] == 0)


def test_global_topk_upload_over_all_kernels():
  rng = np.random.default_rng(1)
  params = {"a": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,))},
            "b": {"kernel": rng.normal(size=(3, 3, 2, 4))}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  up = TopK(sparsity=0.8).client_upload(params, params, (), jnp.int32(1)).values
  allk = np.concatenate([np.ravel(params["a"]["kernel"]), np.ravel(params["b"]["kernel"])])
  k = int(np.ceil(0.2 * allk.size))
  thr = np.sort(np.abs(allk))[::-1][k - 1]
  for name in ("a", "b"):
    kern = np.asarray(params[name]["kernel"])
    np.testing.assert_array_equal(up[name]["kernel"], np.where(np.abs(kern) >= thr, kern, 0))
  np.testing.assert_array_equal(up["a"]["bias"], params["a"]["bias"])     # dense


@pytest.mark.parametrize("shape", [(20, 7), (3, 3, 4, 6)])
def test_spectral_exponent_matches_svd(shape):
  v = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  a = np.abs(v).reshape(-1, shape[-1]).T
  want = 1.0 + np.mean(a / np.linalg.svd(a, compute_uv=False)[0])
  assert float(powerprop.spectral_exponent(jnp.asarray(v))) == pytest.approx(want, rel=1e-4)
  assert float(powerprop.spectral_exponent(jnp.zeros(shape))) == 1.0


def test_regrowth_metric_and_mask_iou_against_numpy(tmp_path):
  rng = np.random.default_rng(3)
  g = {"k": np.where(rng.random((10, 10)) < 0.5, 0.0, 1.0).astype(np.float32)}
  u = {"k": np.where(rng.random((10, 10)) < 0.5, 0.0, 2.0).astype(np.float32)}
  m = TopK().client_metrics(g, type("U", (), {"values": u})(), ())
  assert float(m["regrowth"]) == np.sum((g["k"] == 0) & (u["k"] != 0))
  metrics.save_global_mask(str(tmp_path), 1, g)
  metrics.save_global_mask(str(tmp_path), 2, u)
  rounds, iou = metrics.pairwise_mask_iou(metrics.load_global_masks(str(tmp_path)))
  a, b = g["k"] != 0, u["k"] != 0
  assert rounds == [1, 2]
  assert iou[0, 1] == pytest.approx(np.sum(a & b) / np.sum(a | b))


SMALL = dict(dataset="synthetic", model="small_cnn", synthetic_shape="12,12,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=32, num_clients=4,
             clients_per_round=2, batch_size=8, lr=0.1, rounds=3, progress=False,
             sparsity=0.9, comm_encoding="csr")


@pytest.mark.parametrize("act_threshold, spectral", [("per_batch", False),
                                                      ("first_batch", True)])
def test_sparsyfed_run_keeps_zero_kernels_frozen_and_saves_masks(tmp_path, act_threshold,
                                                                 spectral):
  cfg = ExperimentConfig(**SMALL, algorithm="sparsyfed", act_threshold=act_threshold,
                         spectral_exponent=spectral, mask_every=1, workdir=str(tmp_path / "s"))
  train.run(cfg)
  rows = read_metrics(os.path.join(cfg.workdir, "metrics.jsonl"))
  assert all(np.isfinite(r["train_loss"]) for r in rows)
  # Density after aggregation is at least the per-client density (density gain) and the
  # global mask is stable from round to round.
  assert rows[-1]["density/fc2"] >= 0.0 and 0.0 < rows[-1]["mask_iou"] <= 1.0
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plot_mask_iou.py"),
                         f"--workdir={cfg.workdir}"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert os.path.getsize(os.path.join(cfg.workdir, "mask_iou.png")) > 1000


def test_powerprop_zero_weights_do_not_regrow_locally():
  """β > 1: kernels that are zero in the received model stay zero through local training;
  with β = 1 (Top-K baseline) they regrow."""
  from sparsefl_jax.federated import client as client_lib
  counts = {}
  for alg_name in ("sparsyfed", "topk"):
    cfg = ExperimentConfig(**SMALL, algorithm=alg_name, workdir="/tmp/unused")
    exp = train.build_experiment(cfg)
    state, _ = exp.round_step(exp.init_state, exp.client_data, exp.train_key)   # sparse now
    res = client_lib.local_train(
        exp.algorithm, exp.model, preprocess.make_batch_fn(exp.dataset),
        client_lib.LocalConfig(1, 8, exp.client_data.max_examples), lambda: optax.sgd(0.1),
        state.params, state.model_state,
        exp.algorithm.client_context(state.params, state.algo_state, jnp.int32(2)),
        exp.client_data.x[0],
        exp.client_data.y[0], exp.client_data.counts[0], jax.random.PRNGKey(0), jnp.int32(2))
    kern = lambda t: {k: v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]
                      if "kernel" in jax.tree_util.keystr(k)}
    g, l = kern(state.params), kern(res.params)
    counts[alg_name] = sum(int(np.sum((np.asarray(g[k]) == 0) & (np.asarray(l[k]) != 0)))
                           for k in g)
  assert counts["sparsyfed"] == 0
  assert counts["topk"] > 0


def _sparse_experiment(act_threshold: str):
  """small_cnn (conv1, conv2, fc1, fc2) with ~70%-sparse kernels, so the activation top-K
  keeps a real fraction of each layer's input."""
  cfg = ExperimentConfig(**SMALL, algorithm="sparsyfed", act_threshold=act_threshold,
                         workdir="/tmp/unused")
  exp = train.build_experiment(cfg)
  rng = np.random.default_rng(4)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.where(jnp.asarray(rng.random(x.shape) < 0.7), 0.0, x)
      if jax.tree_util.keystr(p).endswith("['kernel']") else x, exp.init_state.params)
  return exp, params


def _kernel_grads(exp, params, x, client_state, step):
  """Kernel gradients of a fixed linear function of the logits, and the new client state."""
  r = jnp.asarray(np.random.default_rng(5).normal(size=(x.shape[0], 4)), jnp.float32)

  def loss(p):
    logits, _, cs = exp.algorithm.forward(
        exp.model, p, exp.init_state.model_state, x, train=True,
        example_mask=jnp.ones((x.shape[0],), bool), rngs={"dropout": jax.random.PRNGKey(0)},
        client_state=client_state,
        step=LocalStep(jnp.int32(step), jnp.int32(0), jnp.int32(step)))
    return jnp.sum(logits * r), cs

  g, cs = jax.grad(loss, has_aux=True)(params)
  return {name: tree_paths.layer_kernel(g, name) for name in exp.algorithm.layers}, cs


def test_first_batch_caches_conv_thresholds_and_keeps_dense_layers_per_batch():
  """act_threshold=first_batch (the authors' code): conv layers reuse the threshold of the
  round's first batch; dense layers take an exact top-K on every batch, so their gradients
  on batch 2 equal the per_batch variant's, and the conv layers' do not."""
  exp, params = _sparse_experiment("first_batch")
  per, _ = _sparse_experiment("per_batch")
  batch_fn = preprocess.make_batch_fn(exp.dataset)
  xa = batch_fn(exp.client_data.x[0, :8], jax.random.PRNGKey(1), False)
  xb = batch_fn(exp.client_data.x[1, :8], jax.random.PRNGKey(2), False)
  shapes = tree_paths.weight_layers(params, exp.algorithm.layers)
  conv = [n for n, s in shapes.items() if len(s) == 4]
  dense = [n for n, s in shapes.items() if len(s) == 2]
  assert conv and dense
  cs0 = exp.algorithm.client_init(params, exp.init_state.algo_state, jnp.int32(1), None)
  _, cs1 = _kernel_grads(exp, params, xa, cs0, 0)            # first batch: thresholds cached
  g_first, cs2 = _kernel_grads(exp, params, xb, cs1, 1)
  g_per, _ = _kernel_grads(per, params, xb, {}, 1)
  for name in conv:
    assert float(cs2["thr"][name]["thr_a"]) == float(cs1["thr"][name]["thr_a"]) > 0
  for name in dense:                                          # per-batch exact top-K
    np.testing.assert_array_equal(g_first[name], g_per[name])
  assert any(not np.array_equal(g_first[n], g_per[n]) for n in conv)
  assert set(cs0["thr"]) == set(conv)
  assert exp.algorithm.cached_layers == tuple(conv)
  # first_batch_all (the previous behaviour) caches every layer.
  exp_all, _ = _sparse_experiment("first_batch_all")
  assert exp_all.algorithm.cached_layers == tuple(shapes)


@pytest.mark.parametrize("average", ["nonzero", "all"])
def test_spectral_exponent_average_matches_numpy(average):
  rng = np.random.default_rng(6)
  v = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
  v[rng.random(v.shape) < 0.8] = 0.0                          # a sparse layer
  a = np.abs(v).reshape(-1, 6).T.astype(np.float64)
  sigma = np.linalg.svd(a, compute_uv=False)[0]
  mean = a[a != 0].mean() if average == "nonzero" else a.mean()
  want = 1.0 + mean / sigma
  if average == "nonzero":   # the default (the release code)
    assert float(powerprop.spectral_exponent(jnp.asarray(v))) == pytest.approx(want, rel=1e-4)
  got = float(powerprop.spectral_exponent(jnp.asarray(v), average=average))
  assert got == pytest.approx(want, rel=1e-4)


def test_spectral_average_flag_reaches_the_algorithm():
  for average in ("nonzero", "all"):
    cfg = ExperimentConfig(**SMALL, algorithm="sparsyfed", spectral_exponent=True,
                           spectral_average=average, workdir="/tmp/unused")
    exp = train.build_experiment(cfg)
    assert exp.algorithm.spectral_average == average
    betas = exp.algorithm.client_context(exp.init_state.params, (), jnp.int32(1))["betas"]
    kernel = tree_paths.layer_kernel(exp.init_state.params, "conv1")
    assert float(betas["conv1"]) == float(powerprop.spectral_exponent(kernel, average=average))


def test_lr_horizon_sets_the_exponential_schedule_length(tmp_path):
  """lr_t = lr·exp((t/T)·ln(lr_end/lr)) with T = lr_horizon (here 7) instead of rounds (3)."""
  cfg = ExperimentConfig(**dict(SMALL, rounds=3), algorithm="fedavg", lr_schedule="exponential",
                         lr_end=0.01, lr_horizon=7, workdir=str(tmp_path / "h"))
  train.run(cfg)
  rows = read_metrics(os.path.join(cfg.workdir, "metrics.jsonl"))
  for row in rows:
    want = 0.1 * np.exp(row["round"] / 7 * np.log(0.01 / 0.1))
    assert row["lr"] == pytest.approx(want, rel=1e-6)
  with pytest.raises(ConfigError, match=r"lr_horizon=-1 must be >= 0"):
    cfg.replace(lr_horizon=-1).validate()
  speech = ExperimentConfig.from_flagfile(
      os.path.join(ROOT, "experiments", "flags", "sparsyfed_speech.flags"))
  assert speech.lr_horizon == 700 and speech.rounds == 500

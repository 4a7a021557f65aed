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

from sparsefl_jax import ExperimentConfig, metrics, train
from sparsefl_jax.data import preprocess
from sparsefl_jax.algorithms.topk import TopK
from sparsefl_jax.metrics import read_metrics
from sparsefl_jax.models import layers
from sparsefl_jax.sparsity import masks, powerprop

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

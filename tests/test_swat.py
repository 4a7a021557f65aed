"""SWAT's custom VJP and layer op against independent dense references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import models, tree_paths
from sparsefl_jax.models import introspect, layers
from sparsefl_jax.sparsity import swat


class Wrap(nn.Module):
  """Puts one layer at module path 'layer' (ops look layers up by path)."""
  make: object

  @nn.compact
  def __call__(self, x):
    return self.make(name="layer")(x)


def _kth_largest(a, d):
  flat = np.sort(np.abs(np.asarray(a, np.float32)).ravel())[::-1]
  k = int(np.ceil(d * flat.size))
  return flat[k - 1]


def _np_topk(a, d):
  a = np.asarray(a)
  return np.where(np.abs(a) >= _kth_largest(a, d), a, 0.0)


def test_dense_layer_grads_match_numpy_masked_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 20)).astype(np.float32)
  w = rng.normal(size=(20, 7)).astype(np.float32)
  g = rng.normal(size=(6, 7)).astype(np.float32)
  d = 0.3
  thr_w = jnp.float32(_kth_largest(w, d))
  thr_a = jnp.float32(_kth_largest(x, d))
  f = lambda x, w: swat.swat_contract(layers.dense_contract, x, w,
                                       swat.threshold_keep(w, thr_w), thr_a)
  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
  gx, gw = vjp(jnp.asarray(g))
  ws, xs = _np_topk(w, d), _np_topk(x, d)
  np.testing.assert_allclose(y, x @ ws, rtol=1e-5, atol=1e-5)     # dense input forward
  np.testing.assert_allclose(gx, g @ ws.T, rtol=1e-5, atol=1e-5)  # input grad: sparse W
  np.testing.assert_allclose(gw, xs.T @ g, rtol=1e-5, atol=1e-5)  # weight grad: sparse a, dense
  assert np.count_nonzero(gw) > np.count_nonzero(ws)              # pruned weights get gradient


@pytest.mark.parametrize("strides, padding", [(1, "SAME"), (2, "SAME"), (1, "VALID")])
def test_conv_op_matches_vjp_of_lax_conv_at_masked_inputs(strides, padding):
  """The op inside an im2col Conv equals jax.vjp of lax.conv evaluated at (TopK(a), TopK(W))."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 9, 9, 4)), jnp.float32)
  d = 0.25
  op = swat.SwatOp((("layer", d),), method="top_k")
  conv = Wrap(lambda name: layers.Conv(6, 3, strides=strides, padding=padding,
                                       use_bias=False, op=op, name=name))
  params = conv.init(jax.random.PRNGKey(0), x)["params"]
  w = params["layer"]["kernel"]
  y, vjp = jax.vjp(lambda x, w: conv.apply({"params": {"layer": {"kernel": w}}}, x), x, w)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  gx, gw = vjp(g)

  def lax_conv(a, k):
    pad = layers.conv_padding(padding, a.shape[1:3], (3, 3), (strides, strides))
    return jax.lax.conv_general_dilated(a, k, (strides, strides), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xs, ws = jnp.asarray(_np_topk(x, d)), jnp.asarray(_np_topk(w, d))
  y_ref = lax_conv(x, ws)
  _, vjp_ref = jax.vjp(lax_conv, xs, ws)
  gx_ref, gw_ref = vjp_ref(g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_inference_uses_topk_weights_and_dense_layers_stay_dense():
  model_dense = models.get_model("mlp_small", 10)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 28, 28, 1)), jnp.float32)
  params = model_dense.init(jax.random.PRNGKey(0), x)["params"]
  dens = swat.layer_densities(params, 0.9)
  names = [n for n, _ in dens]
  assert names
  op = swat.SwatOp(dens, method="bisection")
  model_sparse = models.get_model("mlp_small", 10, op=op)
  pruned = dict(params)
  for name, d in dens:
    pruned[name] = dict(params[name], kernel=jnp.asarray(_np_topk(params[name]["kernel"], d)))
  np.testing.assert_allclose(model_sparse.apply({"params": params}, x),
                             model_dense.apply({"params": pruned}, x), rtol=1e-5, atol=1e-5)
  last = list(tree_paths.weight_layers(params))[-1]
  assert last not in names   # the classifier stays dense by default


def test_default_sparse_layers_follow_zerofl():
  def ordered_layers(name, classes, shape):
    model = models.get_model(name, classes)
    x = jnp.zeros((1,) + shape)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    order = introspect.weight_layer_order(model, shapes, x)
    return tree_paths.weight_layers(shapes["params"], order)

  leaf = ordered_layers("leaf_cnn", 62, (28, 28, 1))
  assert list(swat.select_sparse_layers(leaf, "default")) == ["conv1", "conv2", "fc1"]
  layers_ = ordered_layers("resnet18", 10, (32, 32, 3))
  assert list(layers_)[0] == "stem" and list(layers_)[-1] == "fc"
  chosen = swat.select_sparse_layers(layers_, "default")
  assert len(chosen) == 16 and "stem" not in chosen and "fc" not in chosen
  assert all(layers_[c][:2] == (3, 3) for c in chosen)
  with pytest.raises(ValueError, match="unknown layers"):
    swat.select_sparse_layers(layers_, "stem,nope")


def test_erk_densities_meet_the_global_budget():
  model = models.get_model("leaf_cnn", 62)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  layers_ = tree_paths.weight_layers(shapes["params"])
  dens = dict(swat.layer_densities(shapes["params"], 0.9, distribution="erk"))
  total = sum(np.prod(layers_[n]) for n in dens)
  kept = sum(d * np.prod(layers_[n]) for n, d in dens.items())
  assert kept == pytest.approx(0.1 * total, rel=1e-6)
  assert dens["conv1"] > dens["fc1"]    # small layers stay denser under ERK


def test_cached_thresholds_are_reused_until_refresh():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
  dens = (("layer", 0.5),)
  op = swat.SwatOp(dens, method="bisection")
  layer = Wrap(lambda name: layers.Dense(4, use_bias=False, op=op, name=name))
  params = layer.init(jax.random.PRNGKey(1), x)["params"]

  def apply(refresh, cached):
    variables = {"params": params,
                 swat.COLLECTION: swat.cache_variables(dens, jnp.asarray(refresh), cached)}
    return layer.apply(variables, x, mutable=[swat.COLLECTION])

  y1, new1 = apply(True, None)
  thr = swat.cached_thresholds(new1[swat.COLLECTION], dens)
  assert float(thr["layer"]["thr_w"]) == pytest.approx(
      _kth_largest(params["layer"]["kernel"], 0.5))
  big = {"layer": {"thr_w": jnp.float32(1e9), "thr_a": jnp.float32(0.0)}}
  y2, new2 = apply(False, big)            # no refresh: the cached threshold (drop all) is used
  np.testing.assert_allclose(y2, 0.0)
  assert float(swat.cached_thresholds(new2[swat.COLLECTION], dens)["layer"]["thr_w"]) == 1e9
  y3, _ = apply(True, big)                # refresh recomputes
  np.testing.assert_allclose(y3, y1)


def test_block_swat_pallas_round_equals_xla_round():
  """A SWAT round with block sparsity through the Pallas kernel (interpret mode) gives the
  same model and metrics as the XLA masked-matmul path."""
  from sparsefl_jax import ExperimentConfig, train
  base = ExperimentConfig(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
                          synthetic_classes=4, synthetic_examples=8, synthetic_test=16,
                          num_clients=2, clients_per_round=2, batch_size=8, rounds=1,
                          algorithm="swat", sparsity=0.5, sparsity_structure="block",
                          block_size=16, progress=False, workdir="/tmp/unused")
  results = []
  for impl in ("xla", "pallas"):
    exp = train.build_experiment(base.replace(matmul_impl=impl))
    state, metrics = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
    ev = exp.evaluate(state.params, state.model_state, state.algo_state, *exp.test_batches)
    results.append((state.params, metrics, ev))
  (p1, m1, e1), (p2, m2, e2) = results
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m1["train_loss"], m2["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(e1["accuracy"], e2["accuracy"])
  with pytest.raises(ValueError, match="needs sparsity_structure='block'"):
    swat.SwatOp((), matmul_impl="pallas")

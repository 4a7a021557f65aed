"""Top-K thresholds and masks against NumPy references."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk

METHODS = ("top_k", "sort", "bisection")
DENSITIES = (0.0, 0.001, 0.05, 0.3, 0.5, 0.07, 0.999, 1.0)


def ref_k(n, density):
  # ceil(d * n), treating products within float rounding of an integer as
  # that integer (SWAT's Python would give ceil(0.07 * 100) = 8).
  return min(n, math.ceil(round(density * n, 6)))


def ref_threshold(x, density):
  a = np.abs(np.asarray(x, np.float32)).ravel()
  k = ref_k(a.size, density)
  if k == 0:
    return np.float32(np.inf)
  return np.partition(a, a.size - k)[a.size - k]  # k-th largest


def make(kind, shape=(7, 11, 13), seed=0):
  rng = np.random.RandomState(seed)
  if kind == "normal":
    return rng.randn(*shape).astype(np.float32)
  if kind == "ties":  # few distinct magnitudes, both signs
    return (rng.randint(-4, 5, size=shape) * 0.25).astype(np.float32)
  if kind == "zeros":  # 60% exact zeros, rest normal
    x = rng.randn(*shape).astype(np.float32)
    x[rng.rand(*shape) < 0.6] = 0.0
    return x
  if kind == "allzero":
    return np.zeros(shape, np.float32)
  raise ValueError(kind)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "allzero"])
def test_threshold_and_mask_match_numpy(method, kind):
  x = make(kind)
  for d in DENSITIES:
    thr = topk.topk_threshold(jnp.asarray(x), d, method)
    want = ref_threshold(x, d)
    assert float(thr) == float(want), (d, float(thr), float(want))
    mask = np.asarray(topk.topk_mask(jnp.asarray(x), d, method))
    np.testing.assert_array_equal(mask, np.abs(x) >= want)
    k = ref_k(x.size, d)
    assert mask.sum() >= k
    if kind == "normal":
      assert mask.sum() == k


def test_edge_densities():
  x = jnp.asarray(make("normal"))
  for method in METHODS:
    assert float(topk.topk_threshold(x, 0.0, method)) == np.inf
    assert not np.asarray(topk.topk_mask(x, 0.0, method)).any()
    assert np.asarray(topk.topk_mask(x, 1.0, method)).all()
    # All-zero tensor at density 1: the threshold is 0 and everything kept.
    z = jnp.zeros((5, 3))
    assert float(topk.topk_threshold(z, 1.0, method)) == 0.0
    assert np.asarray(topk.topk_mask(z, 1.0, method)).all()
    # Any positive density keeps at least one entry.
    assert int(np.asarray(topk.topk_mask(x, 1e-9, method)).sum()) == 1


def test_rounding_snaps_to_integer():
  x = jnp.arange(1, 101, dtype=jnp.float32)
  for method in METHODS:
    assert int(topk.topk_mask(x, 0.07, method).sum()) == 7
    assert int(topk.topk_mask(x, 0.29, method).sum()) == 29
  f = jax.jit(lambda d: topk.topk_mask(x, d, "bisection").sum())
  assert int(f(0.07)) == 7 and int(f(0.29)) == 29 and int(f(0.071)) == 8


def test_negative_zero_and_signs():
  x = jnp.array([-0.0, 0.0, -3.0, 3.0, -1.0, 2.0], jnp.float32)
  for method in METHODS:
    # k = 2: both |3| tie at the top.
    assert float(topk.topk_threshold(x, 2 / 6, method)) == 3.0
    np.testing.assert_array_equal(
        topk.topk_mask(x, 3 / 6, method), [0, 0, 1, 1, 0, 1])


@pytest.mark.parametrize("method", ["sort", "bisection"])
def test_traced_density_under_jit(method):
  x = jnp.asarray(make("ties"))
  f = jax.jit(lambda x, d: topk.topk_threshold(x, d, method))
  for d in DENSITIES:
    assert float(f(x, d)) == float(ref_threshold(np.asarray(x), d)), d


def test_top_k_rejects_traced_density():
  x = jnp.ones((10,))
  with pytest.raises(ValueError, match="bisection"):
    jax.jit(lambda d: topk.topk_threshold(x, d, "top_k"))(0.5)


def test_vmap_over_clients():
  xs = np.stack([make("zeros", (6, 9), seed=s) for s in range(4)])
  ds = np.array([0.0, 0.1, 0.5, 1.0], np.float32)
  # Per-client traced densities with bisection and sort.
  for method in ("bisection", "sort"):
    masks = jax.jit(jax.vmap(lambda x, d: topk.topk_mask(x, d, method)))(
        xs, ds)
    for i in range(4):
      np.testing.assert_array_equal(
          masks[i], np.abs(xs[i]) >= ref_threshold(xs[i], float(ds[i])))
  # One static density shared by all clients with top_k.
  masks = jax.jit(jax.vmap(lambda x: topk.topk_mask(x, 0.2, "top_k")))(xs)
  for i in range(4):
    np.testing.assert_array_equal(
        masks[i], np.abs(xs[i]) >= ref_threshold(xs[i], 0.2))


def test_bisection_equals_top_k_on_1m_entries():
  rng = np.random.RandomState(1)
  # Coarse quantisation gives many ties; a block of exact zeros too.
  x = np.round(rng.randn(1 << 20) * 64).astype(np.float32) / 64
  x[: 1 << 16] = 0.0
  x = jnp.asarray(x)
  for d in (0.05, 0.5, 0.97):
    t1 = topk.topk_threshold(x, d, "top_k")
    t2 = jax.jit(lambda x, d: topk.topk_threshold(x, d, "bisection"))(x, d)
    assert float(t1) == float(t2)
    np.testing.assert_array_equal(np.abs(x) >= t1, np.abs(x) >= t2)


def test_apply_threshold():
  x = jnp.array([[0.5, -2.0], [1.0, -0.1]])
  np.testing.assert_array_equal(
      topk.apply_threshold(x, 1.0), [[0.0, -2.0], [1.0, 0.0]])


def tree_fixture():
  rng = np.random.RandomState(3)
  return {
      "params": {
          "Conv_0": {"kernel": jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32),
                     "bias": jnp.asarray(rng.randn(4) * 10, jnp.float32)},
          "Dense_0": {"kernel": jnp.asarray(
              np.round(rng.randn(8, 5) * 4) / 4, jnp.float32),
                      "bias": jnp.zeros((5,))},
      }
  }


@pytest.mark.parametrize("method", METHODS)
def test_global_topk_masks(method):
  tree = tree_fixture()
  d = 0.2
  masks = topk.global_topk_masks(tree, d, masks_lib.weights_filter, method)
  kernels = [tree["params"]["Conv_0"]["kernel"],
             tree["params"]["Dense_0"]["kernel"]]
  flat = np.concatenate([np.asarray(k).ravel() for k in kernels])
  thr = ref_threshold(flat, d)
  np.testing.assert_array_equal(masks["params"]["Conv_0"]["kernel"],
                                np.abs(kernels[0]) >= thr)
  np.testing.assert_array_equal(masks["params"]["Dense_0"]["kernel"],
                                np.abs(kernels[1]) >= thr)
  # Unselected leaves get all-True masks (the large biases don't compete).
  assert masks["params"]["Conv_0"]["bias"].all()
  chex.assert_shape(masks["params"]["Dense_0"]["bias"], (5,))
  assert masks["params"]["Dense_0"]["bias"].all()
  # No filter: every leaf competes.
  all_masks = topk.global_topk_masks(tree, d, None, method)
  flat_all = np.concatenate(
      [np.asarray(v).ravel() for v in jax.tree.leaves(tree)])
  kept = sum(int(m.sum()) for m in jax.tree.leaves(all_masks))
  assert kept == int((np.abs(flat_all) >= ref_threshold(flat_all, d)).sum())


def test_global_topk_masks_traced_and_vmapped():
  tree = tree_fixture()
  stacked = jax.tree.map(lambda x: jnp.stack([x, -2 * x, x * 0]), tree)
  f = jax.jit(jax.vmap(lambda t, d: topk.global_topk_masks(
      t, d, masks_lib.weights_filter, "bisection"), in_axes=(0, None)))
  out = f(stacked, 0.3)
  want = topk.global_topk_masks(tree, 0.3, masks_lib.weights_filter, "top_k")
  chex.assert_trees_all_equal(jax.tree.map(lambda m: m[0], out), want)
  chex.assert_trees_all_equal(jax.tree.map(lambda m: m[1], out), want)
  # All-zero client: every entry ties at 0, so everything selected is kept.
  assert all(bool(m[2].all()) for m in jax.tree.leaves(out))


def test_layerwise_topk_masks():
  tree = tree_fixture()
  dens = {"params": {"Conv_0": {"kernel": 0.25, "bias": None},
                     "Dense_0": {"kernel": 0.5, "bias": None}}}
  for method in METHODS:
    masks = topk.layerwise_topk_masks(tree, dens, method)
    for name, d in (("Conv_0", 0.25), ("Dense_0", 0.5)):
      k = tree["params"][name]["kernel"]
      np.testing.assert_array_equal(
          masks["params"][name]["kernel"], np.abs(k) >= ref_threshold(k, d))
      assert masks["params"][name]["bias"].all()
  # A scalar density applies to every leaf.
  masks = topk.layerwise_topk_masks(tree, 0.5)
  bias = tree["params"]["Conv_0"]["bias"]
  np.testing.assert_array_equal(masks["params"]["Conv_0"]["bias"],
                                np.abs(bias) >= ref_threshold(bias, 0.5))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_density(bad):
  with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
    topk.topk_threshold(jnp.ones(4), bad)
  with pytest.raises(ValueError, match="density"):
    topk.global_topk_masks({"a": jnp.ones(4)}, bad)


def test_bad_method():
  with pytest.raises(ValueError, match="'quantile'.*top_k, sort, bisection"):
    topk.topk_threshold(jnp.ones(4), 0.5, "quantile")


def test_path_str():
  tree = {"params": {"Conv_0": {"kernel": 1}}, "list": [2, {"x": 3}]}
  paths = [topk.path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths == ["list/0", "list/1/x", "params/Conv_0/kernel"]


@pytest.mark.parametrize("n", [1, 100, 4608, 1 << 20, 11_173_962, 1 << 24])
def test_traced_k_equals_static_k(n):
  """k from a traced float32 density equals the float64 host value."""
  rng = np.random.RandomState(n % 1000)
  ds = np.concatenate([rng.rand(200), np.round(rng.rand(200), 2),
                       [0.0, 1.0, 0.05, 0.9, 0.95]]).astype(np.float32)
  keep = jax.jit(jax.vmap(lambda d: topk.num_to_keep(n, d)))(ds)
  prune = jax.jit(jax.vmap(lambda d: topk.num_to_prune(n, d)))(ds)
  np.testing.assert_array_equal(keep, [topk.num_to_keep(n, d) for d in ds])
  np.testing.assert_array_equal(prune, [topk.num_to_prune(n, d) for d in ds])


class TopKVariantsTest(chex.TestCase):
  """The same thresholds and masks with and without jit (static density)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_threshold_and_mask_match_numpy(self):
    x = make("ties")
    for method in METHODS:
      for d in (0.05, 0.3, 0.999):
        thr = self.variant(lambda v: topk.topk_threshold(v, d, method))(jnp.asarray(x))
        mask = self.variant(lambda v: topk.topk_mask(v, d, method))(jnp.asarray(x))
        chex.assert_shape(mask, x.shape)
        assert float(thr) == float(ref_threshold(x, d)), (method, d)
        chex.assert_trees_all_equal(np.asarray(mask), np.abs(x) >= ref_threshold(x, d))

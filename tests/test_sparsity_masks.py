"""Magnitude pruning, majority voting and mask metrics against NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.sparsity import masks as masks_lib

METHODS = ("bisection", "sort", "top_k")


def variables(seed=0, zero_frac=0.3):
  """A flax-like variables dict with params (zeros, ties) and batch_stats."""
  rng = np.random.RandomState(seed)

  def arr(*shape, scale=1.0):
    x = np.round(rng.randn(*shape) * 8 * scale) / 8  # ties
    x[rng.rand(*shape) < zero_frac] = 0.0
    return jnp.asarray(x, jnp.float32)

  return {
      "params": {
          "Conv_0": {"kernel": arr(3, 3, 3, 8)},
          "BatchNorm_0": {"scale": arr(8, scale=3), "bias": arr(8)},
          "Dense_0": {"kernel": arr(8, 10), "bias": arr(10)},
      },
      "batch_stats": {"BatchNorm_0": {"mean": arr(8, scale=100),
                                      "var": arr(8, scale=100)}},
  }


def ref_prune_masks(tree, s, per_layer=False):
  """FedSparsify's purge: sorted(|w|)[int(s * N)] over trainable leaves."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  trainable = ["batch_stats" not in masks_lib.path_str(p) for p, _ in flat]
  arrays = [np.asarray(x) for _, x in flat]

  def thr_of(xs):
    a = np.sort(np.concatenate([np.abs(x).ravel() for x in xs]))
    return a[int(round(s * a.size, 6))]

  out = []
  if per_layer:
    for x, t in zip(arrays, trainable):
      out.append(np.abs(x) >= thr_of([x]) if t else np.ones(x.shape, bool))
  else:
    thr = thr_of([x for x, t in zip(arrays, trainable) if t])
    out = [np.abs(x) >= thr if t else np.ones(x.shape, bool)
           for x, t in zip(arrays, trainable)]
  return jax.tree.unflatten(treedef, out)


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_layer", [False, True])
def test_magnitude_masks_match_reference(method, per_layer):
  tree = variables()
  for s in (0.0, 0.1, 0.5, 0.9, 0.95, 0.999):
    got = masks_lib.magnitude_masks(tree, s, per_layer=per_layer,
                                    method=method)
    assert_trees_equal(got, ref_prune_masks(tree, s, per_layer))


def test_sparsity_zero_keeps_everything_including_zeros():
  tree = variables()
  m = masks_lib.magnitude_masks(tree, 0.0)
  assert all(bool(x.all()) for x in jax.tree.leaves(m))
  assert_trees_equal(masks_lib.magnitude_prune(tree, 0.0), tree)


def test_batch_stats_untouched_and_sparsity_absolute():
  tree = variables(zero_frac=0.0)
  pruned = masks_lib.magnitude_prune(tree, 0.3)
  assert_trees_equal(pruned["batch_stats"], tree["batch_stats"])
  # Zeros take part in the sort, so 0.6 after 0.3 is 0.6 overall, not
  # 0.3 + 0.6 * 0.7: the result equals pruning the original to 0.6.
  pruned2 = masks_lib.magnitude_prune(pruned, 0.6)
  assert_trees_equal(pruned2, masks_lib.magnitude_prune(tree, 0.6))
  n = masks_lib.size(tree, masks_lib.trainable_filter)
  zeros = n - int(masks_lib.nnz(pruned2, masks_lib.trainable_filter))
  assert zeros <= int(0.6 * n)  # ties with the threshold are kept
  # Re-pruning at the same sparsity changes nothing.
  assert_trees_equal(masks_lib.magnitude_prune(pruned2, 0.6), pruned2)
  # Without ties the target is hit exactly.
  flat = {"w": jnp.asarray(np.random.RandomState(0).randn(1000), jnp.float32)}
  assert int(masks_lib.nnz(masks_lib.magnitude_prune(flat, 0.9))) == 100


def test_traced_sparsity_and_vmap():
  tree = variables()
  f = jax.jit(lambda t, s: masks_lib.magnitude_masks(t, s))
  for s in (0.0, 0.25, 0.9):
    assert_trees_equal(f(tree, s), ref_prune_masks(tree, s))
  trees = [variables(seed=i) for i in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  g = jax.jit(jax.vmap(masks_lib.magnitude_masks, in_axes=(0, None)))
  out = g(stacked, 0.7)
  for i, t in enumerate(trees):
    assert_trees_equal(jax.tree.map(lambda m: m[i], out),
                       ref_prune_masks(t, 0.7))


def test_custom_filter_weights_only():
  tree = variables()
  m = masks_lib.magnitude_masks(tree, 0.5, masks_lib.weights_filter)
  assert m["params"]["Dense_0"]["bias"].all()
  assert m["params"]["BatchNorm_0"]["scale"].all()
  kernels = [tree["params"]["Conv_0"]["kernel"],
             tree["params"]["Dense_0"]["kernel"]]
  a = np.sort(np.concatenate([np.abs(np.asarray(k)).ravel()
                              for k in kernels]))
  thr = a[int(0.5 * a.size)]
  np.testing.assert_array_equal(m["params"]["Conv_0"]["kernel"],
                                np.abs(kernels[0]) >= thr)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity(bad):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    masks_lib.magnitude_prune(variables(), bad)


def test_filters():
  assert masks_lib.weights_filter("params/Conv_0/kernel", np.ones((3, 3, 1, 2)))
  assert not masks_lib.weights_filter("params/Conv_0/bias", np.ones(2))
  assert not masks_lib.weights_filter("params/x/kernel", np.ones(2))
  assert masks_lib.trainable_filter("params/BatchNorm_0/scale", np.ones(2))
  assert not masks_lib.trainable_filter("batch_stats/BatchNorm_0/mean",
                                        np.ones(2))


@pytest.mark.parametrize("k", [1, 3, 4, 10])
def test_majority_vote(k):
  rng = np.random.RandomState(k)
  ms = {"a": rng.rand(k, 5, 4) < 0.5, "b": rng.rand(k, 7) < 0.3}
  got = masks_lib.majority_vote(jax.tree.map(jnp.asarray, ms))
  for name, m in ms.items():
    want = np.zeros(m.shape[1:], bool)
    for idx in np.ndindex(*m.shape[1:]):
      want[idx] = sum(m[(c,) + idx] for c in range(k)) >= k // 2
    np.testing.assert_array_equal(got[name], want)
  strict = masks_lib.majority_vote(jax.tree.map(jnp.asarray, ms), threshold=k)
  np.testing.assert_array_equal(strict["a"], ms["a"].all(0))


def test_majority_vote_merge_averages_over_all_clients():
  rng = np.random.RandomState(0)
  k = 4
  params = rng.randn(k, 6).astype(np.float32)
  masks = rng.rand(k, 6) < 0.6
  params = params * masks  # clients upload pruned weights
  weights = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  got = masks_lib.majority_vote_merge(
      {"w": jnp.asarray(params)}, {"w": jnp.asarray(masks)},
      jnp.asarray(weights))["w"]
  for j in range(6):
    mean = sum(weights[c] * params[c, j] for c in range(k)) / weights.sum()
    keep = masks[:, j].sum() >= k // 2
    np.testing.assert_allclose(got[j], mean if keep else 0.0, rtol=1e-6)
  avg = masks_lib.weighted_average({"w": jnp.asarray(params)})["w"]
  np.testing.assert_allclose(avg, params.mean(0), rtol=1e-6)


def test_density_metrics():
  tree = variables()
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  nz = sum(int(np.count_nonzero(x)) for x in leaves)
  n = sum(x.size for x in leaves)
  assert int(masks_lib.nnz(tree)) == nz
  np.testing.assert_allclose(masks_lib.density(tree), nz / n, rtol=1e-6)
  k = tree["params"]["Conv_0"]["kernel"]
  np.testing.assert_allclose(
      masks_lib.per_layer_density(tree)["params"]["Conv_0"]["kernel"],
      np.count_nonzero(k) / k.size, rtol=1e-6)
  np.testing.assert_allclose(masks_lib.layer_zero_fraction(k),
                             1 - np.count_nonzero(k) / k.size, rtol=1e-6)
  assert_trees_equal(masks_lib.mask_of(tree),
                     jax.tree.map(lambda x: np.asarray(x) != 0, tree))
  sel = masks_lib.density(tree, masks_lib.weights_filter)
  kernels = [tree["params"]["Conv_0"]["kernel"],
             tree["params"]["Dense_0"]["kernel"]]
  np.testing.assert_allclose(
      sel, sum(np.count_nonzero(x) for x in kernels)
      / sum(x.size for x in kernels), rtol=1e-6)


def test_mask_iou_and_regrowth():
  a, b = variables(seed=1), variables(seed=2)
  inter = union = 0
  regrow = deact = 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    for xi, yi in zip(x, y):
      inter += (xi != 0) and (yi != 0)
      union += (xi != 0) or (yi != 0)
      regrow += (xi == 0) and (yi != 0)
      deact += (xi != 0) and (yi == 0)
  np.testing.assert_allclose(
      masks_lib.mask_iou(masks_lib.mask_of(a), masks_lib.mask_of(b)),
      inter / union, rtol=1e-6)
  np.testing.assert_allclose(masks_lib.mask_iou(a, b), inter / union,
                             rtol=1e-6)
  assert float(masks_lib.mask_iou(a, a)) == 1.0
  z = jax.tree.map(jnp.zeros_like, a)
  assert float(masks_lib.mask_iou(z, z)) == 1.0
  assert float(masks_lib.mask_iou(a, z)) == 0.0
  assert int(masks_lib.regrowth(a, b)) == regrow
  assert int(masks_lib.deactivation(a, b)) == deact
  # Jittable and vmappable over clients against one global model.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), b, a)
  r = jax.jit(jax.vmap(masks_lib.regrowth, in_axes=(None, 0)))(a, stacked)
  np.testing.assert_array_equal(r, [regrow, 0])


def test_pack_unpack_roundtrip():
  rng = np.random.RandomState(0)
  ms = {"a": jnp.asarray(rng.rand(3, 5, 7) < 0.5),
        "b": jnp.asarray(rng.rand(1) < 0.5),
        "c": jnp.asarray(rng.rand(13, 3) < 0.1)}
  packed = masks_lib.pack_masks(ms)
  assert packed["a"].bits.dtype == jnp.uint8
  assert packed["a"].bits.shape == (14,)  # ceil(105 / 8)
  assert_trees_equal(masks_lib.unpack_masks(packed), ms)
  # Under jit and vmap over a client axis.
  stacked = jax.tree.map(lambda x: jnp.stack([x, ~x]), ms)
  f = jax.jit(jax.vmap(lambda m: masks_lib.unpack_masks(
      masks_lib.pack_masks(m))))
  assert_trees_equal(f(stacked), stacked)

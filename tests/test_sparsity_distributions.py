"""Uniform and ERK per-layer sparsity distributions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.sparsity import distributions
from sparsefl_jax.sparsity import topk


def model():
  z = np.zeros
  return {"params": {
      "Conv_0": {"kernel": z((3, 3, 3, 16)), "bias": z(16)},
      "Conv_1": {"kernel": z((3, 3, 16, 64))},
      "Conv_2": {"kernel": z((3, 3, 64, 128))},
      "BatchNorm_0": {"scale": z(64), "bias": z(64)},
      "Dense_0": {"kernel": z((128, 10)), "bias": z(10)},
  }}


def kernels(tree):
  p = tree["params"]
  return {n: p[n]["kernel"] for n in ("Conv_0", "Conv_1", "Conv_2",
                                      "Dense_0")}


def test_uniform():
  s = distributions.uniform(model(), 0.9)
  assert s["params"]["Conv_1"]["kernel"] == 0.9
  assert s["params"]["Dense_0"]["kernel"] == 0.9
  assert s["params"]["Conv_0"]["bias"] is None
  assert s["params"]["BatchNorm_0"]["scale"] is None
  d = distributions.to_densities(s)
  assert d["params"]["Conv_1"]["kernel"] == pytest.approx(0.1)
  assert d["params"]["Dense_0"]["bias"] is None


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_total_nonzeros(sparsity):
  tree = model()
  s = distributions.erk(tree, sparsity)
  ks = kernels(tree)
  n_sel = sum(k.size for k in ks.values())
  nnz = sum((1 - s["params"][n]["kernel"]) * k.size for n, k in ks.items())
  assert nnz == pytest.approx((1 - sparsity) * n_sel, rel=1e-9)
  # After rounding each layer's kept count (k = ceil(d * n)), within 1 each.
  kept = sum(math.ceil((1 - s["params"][n]["kernel"]) * k.size - 1e-9)
             for n, k in ks.items())
  assert abs(kept - (1 - sparsity) * n_sel) <= len(ks)
  assert s["params"]["Conv_0"]["bias"] is None
  for n in ks:
    assert 0.0 <= s["params"][n]["kernel"] < 1.0


def test_erk_makes_small_layers_dense():
  tree = model()
  # At 50% the raw ERK density of the 432-entry stem exceeds 1: dense.
  s = distributions.erk(tree, 0.5)
  assert s["params"]["Conv_0"]["kernel"] == 0.0
  assert s["params"]["Dense_0"]["kernel"] == 0.0
  assert 0.5 < s["params"]["Conv_2"]["kernel"] < 1.0
  # At 99% nothing is dense; densities follow (Σ dims)/(Π dims).
  s = distributions.erk(tree, 0.99)
  ks = kernels(tree)
  dens = {n: 1 - s["params"][n]["kernel"] for n in ks}
  raw = {n: sum(k.shape) / math.prod(k.shape) for n, k in ks.items()}
  assert all(d < 1.0 for d in dens.values())
  eps = {n: dens[n] / raw[n] for n in ks}
  assert max(eps.values()) == pytest.approx(min(eps.values()), rel=1e-9)


def test_erk_power_scale_zero_is_uniform_and_edge_sparsities():
  tree = model()
  s = distributions.erk(tree, 0.7, power_scale=0.0)
  for n in kernels(tree):
    assert s["params"][n]["kernel"] == pytest.approx(0.7)
  s0 = distributions.erk(tree, 0.0)
  assert all(v == 0.0 for v in jax.tree.leaves(s0))


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_sparsity(bad):
  with pytest.raises(ValueError, match="sparsity"):
    distributions.uniform(model(), bad)
  with pytest.raises(ValueError, match="sparsity"):
    distributions.erk(model(), bad)


def test_erk_feeds_layerwise_masks():
  rng = np.random.RandomState(0)
  tree = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32),
                      model())
  dens = distributions.to_densities(distributions.erk(tree, 0.9))
  masks = topk.layerwise_topk_masks(tree, dens, "bisection")
  for n, k in kernels(tree).items():
    d = dens["params"][n]["kernel"]
    assert int(masks["params"][n]["kernel"].sum()) == math.ceil(
        round(d * k.size, 6))
  assert masks["params"]["BatchNorm_0"]["scale"].all()

"""Block-structured top-K masks against NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.sparsity import block


def np_scores(w, bk, bn, norm):
  w = np.abs(np.asarray(w, np.float64))
  kb, nb = -(-w.shape[0] // bk), -(-w.shape[1] // bn)
  out = np.zeros((kb, nb))
  for i in range(kb):
    for j in range(nb):
      blk = w[i * bk:(i + 1) * bk, j * bn:(j + 1) * bn]
      out[i, j] = blk.sum() if norm == 'l1' else np.sqrt((blk ** 2).sum())
  return out


def np_block_mask(w, density, bk, bn, norm):
  s = np_scores(w, bk, bn, norm).astype(np.float32)
  k = min(s.size, math.ceil(round(density * s.size, 6)))
  if k == 0:
    return np.zeros(s.shape, bool)
  thr = np.sort(s.ravel())[::-1][k - 1]
  return s >= thr


SHAPES = [((64, 48), (16, 16)), ((50, 30), (16, 8)), ((9, 20), (4, 32))]


@pytest.mark.parametrize('shape,bs', SHAPES)
@pytest.mark.parametrize('norm', ['l2', 'l1'])
def test_block_scores_match_numpy(shape, bs, norm):
  w = np.random.RandomState(0).randn(*shape).astype(np.float32)
  got = np.asarray(block.block_scores(w, bs, norm))
  np.testing.assert_allclose(got, np_scores(w, *bs, norm), rtol=1e-5)


@pytest.mark.parametrize('shape,bs', SHAPES)
@pytest.mark.parametrize('density', [0.0, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize('norm', ['l2', 'l1'])
def test_block_topk_mask_matches_numpy(shape, bs, density, norm):
  w = np.random.RandomState(1).randn(*shape).astype(np.float32)
  got = np.asarray(block.block_topk_mask(w, density, bs, norm))
  want = np_block_mask(w, density, *bs, norm)
  np.testing.assert_array_equal(got, want)
  s = np_scores(w, *bs, norm)
  assert got.sum() == min(s.size, math.ceil(round(density * s.size, 6)))  # no ties here


def test_ties_are_all_kept():
  # 4x4 blocks of 2x2; every block has the same norm except one larger block.
  w = np.ones((8, 8), np.float32)
  w[:2, :2] = 3.0
  m = np.asarray(block.block_topk_mask(w, 2 / 16, 2))
  assert m[0, 0] and m.sum() == 16  # the 2nd-largest score ties with 15 blocks
  m = np.asarray(block.block_topk_mask(w, 1 / 16, 2))
  assert m.sum() == 1 and m[0, 0]


@pytest.mark.parametrize('method', ['sort', 'bisection'])
def test_traced_density_under_jit(method):
  w = np.random.RandomState(2).randn(40, 24).astype(np.float32)
  f = jax.jit(lambda w, d: block.block_topk_mask(w, d, 8, 'l2', method))
  for d in (0.0, 0.2, 0.6, 1.0):
    np.testing.assert_array_equal(np.asarray(f(w, jnp.float32(d))),
                                  np_block_mask(w, d, 8, 8, 'l2'))


def test_expand_block_mask_2d_and_conv_shape():
  bm = np.array([[1, 0], [0, 1]], bool)
  full = np.asarray(block.expand_block_mask(bm, (3, 2), (5, 3)))
  want = np.zeros((5, 3), bool)
  want[:3, :2] = True
  want[3:, 2:] = True
  np.testing.assert_array_equal(full, want)
  # conv kernel (kh, kw, cin, cout) through its (kh*kw*cin, cout) view
  k = np.random.RandomState(3).randn(3, 3, 4, 6).astype(np.float32)
  b = block.block_topk_mask(block.as_2d(k), 0.5, 8)
  e = np.asarray(block.expand_block_mask(b, 8, k.shape))
  assert e.shape == k.shape
  np.testing.assert_array_equal(e.reshape(36, 6),
                                np.repeat(np.repeat(np.asarray(b), 8, 0), 8, 1)[:36, :6])
  with pytest.raises(ValueError, match='does not tile'):
    block.expand_block_mask(np.ones((3, 3), bool), 8, k.shape)


def _tree():
  rng = np.random.RandomState(4)
  return {'params': {
      'conv1': {'kernel': rng.randn(3, 3, 2, 8).astype(np.float32),
                'bias': rng.randn(8).astype(np.float32)},
      'fc1': {'kernel': rng.randn(40, 12).astype(np.float32),
              'bias': rng.randn(12).astype(np.float32)}}}


def test_layerwise_block_masks_tree():
  tree = _tree()
  masks = block.layerwise_block_masks(tree, 0.5, 4)
  for name in ('conv1', 'fc1'):
    k = tree['params'][name]['kernel']
    want = np_block_mask(k.reshape(-1, k.shape[-1]), 0.5, 4, 4, 'l2')
    want = np.repeat(np.repeat(want, 4, 0), 4, 1)[:k.size // k.shape[-1], :k.shape[-1]]
    np.testing.assert_array_equal(np.asarray(masks['params'][name]['kernel']),
                                  want.reshape(k.shape))
    assert np.asarray(masks['params'][name]['bias']).all()
  raw = block.layerwise_block_masks(tree, 0.5, 4, expand=False)
  assert raw['params']['fc1']['kernel'].shape == (10, 3)
  assert raw['params']['fc1']['bias'] is None
  dens = {'params': {'conv1': {'kernel': None, 'bias': None},
                     'fc1': {'kernel': 0.25, 'bias': None}}}
  per = block.layerwise_block_masks(tree, dens, 4)
  assert np.asarray(per['params']['conv1']['kernel']).all()


def test_global_block_masks_tree():
  tree = _tree()
  masks = block.global_block_masks(tree, 0.3, 4, norm='l1', expand=False)
  s = [np_scores(tree['params'][n]['kernel'].reshape(-1, tree['params'][n]['kernel'].shape[-1]),
                 4, 4, 'l1').astype(np.float32) for n in ('conv1', 'fc1')]
  allv = np.concatenate([x.ravel() for x in s])
  k = math.ceil(0.3 * allv.size)
  thr = np.sort(allv)[::-1][k - 1]
  for n, sc in zip(('conv1', 'fc1'), s):
    np.testing.assert_array_equal(np.asarray(masks['params'][n]['kernel']), sc >= thr)
  assert sum(int(np.sum(masks['params'][n]['kernel'])) for n in ('conv1', 'fc1')) == k


def test_validation_errors():
  with pytest.raises(ValueError, match='norm'):
    block.block_scores(np.ones((4, 4)), 2, 'linf')
  with pytest.raises(ValueError, match='positive'):
    block.block_scores(np.ones((4, 4)), 0)
  with pytest.raises(ValueError, match='2-D'):
    block.block_scores(np.ones((4, 4, 4)), 2)
  with pytest.raises(ValueError, match='density'):
    block.block_topk_mask(np.ones((4, 4)), 1.5, 2)

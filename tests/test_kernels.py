"""Pallas block-sparse matmul and BlockSparseOp (interpret mode on CPU).

Follows the Pallas-ops test idiom: a base class with ``INTERPRET = False`` that
only runs on an accelerator, and an ``...InterpretTest`` subclass with
``INTERPRET = True`` that runs the same assertions on CPU. Grids stay small
(interpret mode costs ~0.5 ms per grid step).
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import models
from sparsefl_jax.kernels import block_sparse_matmul as bsmm_lib
from sparsefl_jax.kernels import ops
from sparsefl_jax.kernels.block_sparse_matmul import (block_sparse_matmul,
                                                      block_sparse_matmul_reference,
                                                      nonzero_block_lists)
from sparsefl_jax.sparsity import block as block_lib


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def rand(rng, *shape):
  return jnp.asarray(rng.randn(*shape).astype(np.float32))


def rand_mask(rng, shape, density):
  if density == 0.0:
    return np.zeros(shape, bool)
  if density == 1.0:
    return np.ones(shape, bool)
  m = rng.rand(*shape) < density
  m.flat[rng.randint(m.size)] = True  # at least one block
  return m


def grid(k, n, bk, bn):
  return (-(-k // bk), -(-n // bn))


# (M, K, N, (bm, bk, bn)): multiples, non-multiples on every axis, tiny M.
SHAPES = [
    (32, 64, 48, (16, 16, 16)),
    (37, 100, 70, (16, 32, 32)),
    (5, 24, 40, (8, 8, 16)),
]
DENSITIES = [0.0, 0.4, 1.0]


class TestBlockSparseMatmul:
  INTERPRET = False
  BACKENDS = ('auto',)

  @pytest.fixture(autouse=True)
  def _skip_on_cpu(self):
    if not self.INTERPRET and jax.default_backend() == 'cpu':
      pytest.skip('compiled Pallas needs a TPU/GPU; see the InterpretTest subclass')

  def call(self, x, w, m, bs, backend='auto', **kw):
    return block_sparse_matmul(x, w, m, block_size=bs, interpret=self.INTERPRET,
                               backend=backend, **kw)

  def backends(self):
    return ('tpu', 'gpu') if self.INTERPRET else ('auto',)

  @pytest.mark.parametrize('shape', SHAPES)
  @pytest.mark.parametrize('density', DENSITIES)
  def test_forward_matches_reference(self, shape, density):
    m_, k, n, bs = shape
    rng = np.random.RandomState(hash((shape[:3], density)) % 2**31)
    x, w = rand(rng, m_, k), rand(rng, k, n)
    mask = rand_mask(rng, grid(k, n, bs[1], bs[2]), density)
    want = block_sparse_matmul_reference(x, w, mask, bs)
    for backend in self.backends():
      got = self.call(x, w, mask, bs, backend)
      assert got.shape == (m_, n) and got.dtype == jnp.float32
      if density == 0.0:
        np.testing.assert_array_equal(np.asarray(got), 0.0)
      else:
        assert rel_err(got, want) < 1e-5, backend
    if density == 1.0:
      assert rel_err(want, x @ w) < 1e-5

  def test_int_block_size_and_jit_traced_mask(self):
    rng = np.random.RandomState(0)
    x, w = rand(rng, 16, 40), rand(rng, 40, 24)
    mask = jnp.asarray(rand_mask(rng, grid(40, 24, 16, 16), 0.5))
    f = jax.jit(lambda x, w, m: self.call(x, w, m, 16))
    assert rel_err(f(x, w, mask), block_sparse_matmul_reference(x, w, mask, 16)) < 1e-5

  def test_max_nonzero_blocks(self):
    rng = np.random.RandomState(1)
    x, w = rand(rng, 16, 64), rand(rng, 64, 32)
    mask = np.zeros((4, 2), bool)
    mask[[0, 3], 0] = True
    mask[2, 1] = True
    want = block_sparse_matmul_reference(x, w, mask, 16)
    for backend in self.backends():
      got = self.call(x, w, mask, 16, backend, max_nonzero_blocks=2)
      assert rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match='max_nonzero_blocks'):
      self.call(x, w, mask, 16, max_nonzero_blocks=1)

  def test_bfloat16_inputs(self):
    rng = np.random.RandomState(2)
    x = rand(rng, 16, 32).astype(jnp.bfloat16)
    w = rand(rng, 32, 32).astype(jnp.bfloat16)
    mask = np.array([[True, False], [True, True]])
    got = self.call(x, w, mask, 16)
    assert got.dtype == jnp.bfloat16
    want = block_sparse_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                         mask, 16)
    assert rel_err(got.astype(jnp.float32), want) < 1e-2

  @pytest.mark.parametrize('shape', SHAPES[1:])
  def test_grads_match_reference_vjp(self, shape):
    m_, k, n, bs = shape
    rng = np.random.RandomState(3)
    x, w = rand(rng, m_, k), rand(rng, k, n)
    mask = rand_mask(rng, grid(k, n, bs[1], bs[2]), 0.5)
    g = rand(rng, m_, n)
    _, vjp_ref = jax.vjp(lambda x, w: block_sparse_matmul_reference(x, w, mask, bs), x, w)
    dx_ref, dw_ref = vjp_ref(g)
    for backend in self.backends():
      f = jax.jit(lambda x, w: jax.vjp(
          lambda a, b: self.call(a, b, mask, bs, backend), x, w)[1](g))
      dx, dw = f(x, w)
      assert rel_err(dx, dx_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5
      keep = np.asarray(bsmm_lib.expand_mask(mask, bs[1:], w.shape))
      assert np.all(np.asarray(dw)[~keep] == 0.0)

  def test_grad_all_zero_mask(self):
    rng = np.random.RandomState(4)
    x, w = rand(rng, 8, 32), rand(rng, 32, 16)
    mask = np.zeros((2, 1), bool)
    dx, dw = jax.grad(lambda x, w: jnp.sum(self.call(x, w, mask, (8, 16, 16)) ** 2),
                      (0, 1))(x, w)
    assert not np.any(np.asarray(dx)) and not np.any(np.asarray(dw))

  def test_vmap_over_clients_with_per_client_masks(self):
    rng = np.random.RandomState(5)
    c, m_, k, n, b = 3, 16, 48, 32, 16
    xs, ws = rand(rng, c, m_, k), rand(rng, c, k, n)
    densities = (0.2, 0.5, 1.0)

    def masks_of(ws):  # traced, per-client block top-K
      return jnp.stack([block_lib.block_topk_mask(ws[i], d, b)
                        for i, d in enumerate(densities)])

    @jax.jit
    def run(xs, ws):
      ms = masks_of(ws)
      loss = lambda x, w, m: jnp.sum(jnp.tanh(self.call(x, w, m, b)))
      y = jax.vmap(lambda x, w, m: self.call(x, w, m, b))(xs, ws, ms)
      return y, jax.vmap(jax.grad(loss, (0, 1)))(xs, ws, ms)

    y, (dx, dw) = run(xs, ws)
    ms = masks_of(ws)
    for i in range(c):
      ref = lambda x, w: block_sparse_matmul_reference(x, w, ms[i], b)
      assert rel_err(y[i], ref(xs[i], ws[i])) < 1e-5
      gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.tanh(ref(x, w))), (0, 1))(xs[i], ws[i])
      assert rel_err(dx[i], gx) < 1e-5 and rel_err(dw[i], gw) < 1e-5


class TestBlockSparseMatmulInterpret(TestBlockSparseMatmul):
  INTERPRET = True


# ------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize('t_len', [None, 2])
def test_nonzero_block_lists(t_len):
  mask = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0]], bool)
  idx, cnt = nonzero_block_lists(mask, t_len)
  t = 3 if t_len is None else t_len
  assert idx.shape == (4, t)
  np.testing.assert_array_equal(np.asarray(cnt), np.minimum(mask.sum(0), t))
  for j in range(4):
    nz = np.flatnonzero(mask[:, j])[:t]
    row = np.asarray(idx[j])
    np.testing.assert_array_equal(row[:len(nz)], nz)
    np.testing.assert_array_equal(row[len(nz):], nz[-1] if len(nz) else 0)


def test_argument_validation():
  x, w = jnp.ones((8, 32)), jnp.ones((32, 16))
  with pytest.raises(ValueError, match='block_mask shape'):
    block_sparse_matmul(x, w, np.ones((2, 2), bool), block_size=16, interpret=True)
  with pytest.raises(ValueError, match='contraction'):
    block_sparse_matmul(x, w.T, np.ones((1, 2), bool), block_size=16, interpret=True)
  with pytest.raises(ValueError, match='backend'):
    block_sparse_matmul(x, w, np.ones((2, 1), bool), block_size=16, backend='cuda')
  with pytest.raises(ValueError, match='Mosaic'):
    bsmm_lib.make_config(32, interpret=False, backend='tpu')
  with pytest.raises(ValueError, match='Triton'):
    bsmm_lib.make_config((16, 24, 32), interpret=False, backend='gpu')
  bsmm_lib.make_config((8, 128, 256), interpret=False, backend='tpu')
  bsmm_lib.make_config((16, 32, 64), interpret=False, backend='gpu')


# ----------------------------------------------------------------- op in models


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xla_swat(contract, x, xs, w, keep):
  return contract(x, jnp.where(keep, w, 0.0))


def _xla_swat_fwd(contract, x, xs, w, keep):
  return _xla_swat(contract, x, xs, w, keep), (x, xs, w, keep)


def _xla_swat_bwd(contract, res, g):
  x, xs, w, keep = res
  _, vx = jax.vjp(lambda a: contract(a, jnp.where(keep, w, 0.0)), x)
  _, vw = jax.vjp(lambda b: contract(xs, b), w)
  return vx(g)[0], jnp.zeros_like(xs), vw(g)[0], None


_xla_swat.defvjp(_xla_swat_fwd, _xla_swat_bwd)


@dataclasses.dataclass(frozen=True)
class XlaBlockMaskedOp:
  """Independent XLA version: contract(x, w * mask) with the same backward rules."""
  density: float
  block: int
  backward: str = 'swat'
  activation_density: float = None

  def __call__(self, module, contract, x, kernel):
    del module
    k2d = jax.lax.stop_gradient(kernel).reshape(-1, kernel.shape[-1])
    bm = block_lib.block_topk_mask(k2d, self.density, self.block)
    keep = block_lib.expand_block_mask(bm, self.block, kernel.shape)
    if self.backward == 'exact':
      return contract(x, jnp.where(keep, kernel, 0.0))
    xs = x
    if self.activation_density is not None:
      ax = jnp.abs(jax.lax.stop_gradient(x)).ravel()
      k = int(np.ceil(self.activation_density * ax.size))
      thr = jax.lax.top_k(ax, k)[0].min()
      xs = jnp.where(jnp.abs(x) >= thr, x, 0.0)
    return _xla_swat(contract, x, jax.lax.stop_gradient(xs), kernel, keep)


def _loss(model, params, x, y):
  logits = model.apply({'params': params}, x)
  return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]) * -1.0


MODEL_CASES = [
    ('mlp_small', 'swat', None),
    ('mlp_small', 'exact', None),
    ('small_cnn', 'exact', None),
    ('small_cnn', 'swat', 0.5),
]


class TestBlockSparseOp:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _skip_on_cpu(self):
    if not self.INTERPRET and jax.default_backend() == 'cpu':
      pytest.skip('compiled Pallas needs a TPU/GPU; see the InterpretTest subclass')

  def op(self, backward, act=None, density=0.5, block=16):
    return ops.BlockSparseOp(density, (32, block, block), backward=backward,
                             activation_density=act, interpret=self.INTERPRET)

  @pytest.mark.parametrize('name,backward,act', MODEL_CASES)
  def test_model_outputs_and_grads_match_xla(self, name, backward, act):
    rng = np.random.RandomState(6)
    x = rand(rng, 2, 4, 4, 1) if name == 'small_cnn' else rand(rng, 2, 8, 8, 1)
    y = jnp.asarray([1, 3])
    m_k = models.get_model(name, 10, op=self.op(backward, act))
    m_x = models.get_model(name, 10, op=XlaBlockMaskedOp(0.5, 16, backward, act))
    params = m_x.init(jax.random.PRNGKey(0), x)['params']
    out_k = jax.jit(lambda p: m_k.apply({'params': p}, x))(params)
    out_x = m_x.apply({'params': params}, x)
    assert rel_err(out_k, out_x) < 1e-5
    g_k = jax.jit(jax.grad(functools.partial(_loss, m_k)))(params, x, y)
    g_x = jax.grad(functools.partial(_loss, m_x))(params, x, y)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_k)[0],
                            jax.tree.leaves(g_x)):
      assert rel_err(a, b) < 1e-4, path
    if backward == 'swat':  # dense weight gradient: pruned blocks get gradient too
      k = params['fc1']['kernel']
      keep = block_lib.expand_block_mask(
          block_lib.block_topk_mask(k.reshape(-1, k.shape[-1]), 0.5, 16), 16, k.shape)
      assert np.any(np.asarray(g_k['fc1']['kernel'])[~np.asarray(keep)] != 0)

  def test_vmapped_clients_in_model(self):
    rng = np.random.RandomState(7)
    xs = rand(rng, 2, 3, 8, 8, 1)
    ys = jnp.asarray([[1, 2, 3], [4, 5, 6]])
    m_k = models.get_model('mlp_small', 10, op=self.op('swat', density=0.3))
    m_x = models.get_model('mlp_small', 10, op=XlaBlockMaskedOp(0.3, 16))
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    params = jax.vmap(lambda k: m_x.init(k, xs[0])['params'])(keys)
    gk = jax.jit(jax.vmap(jax.grad(functools.partial(_loss, m_k))))(params, xs, ys)
    gx = jax.vmap(jax.grad(functools.partial(_loss, m_x)))(params, xs, ys)
    for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gx)):
      assert rel_err(a, b) < 1e-4

  def test_op_is_hashable_and_validates(self):
    assert hash(self.op('swat')) == hash(self.op('swat'))
    with pytest.raises(ValueError, match='backward'):
      ops.BlockSparseOp(0.5, backward='dense')
    with pytest.raises(ValueError, match='density'):
      ops.BlockSparseOp(1.5)

  def test_unsupported_module(self):
    class Other(nn.Module):
      @nn.compact
      def __call__(self, x):
        return x

    with pytest.raises(TypeError, match='Dense'):
      self.op('swat')(Other(), None, jnp.ones((2, 4)), jnp.ones((4, 4)))


class TestBlockSparseOpInterpret(TestBlockSparseOp):
  INTERPRET = True

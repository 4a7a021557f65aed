"""Layer tests: im2col conv vs lax conv and a numpy loop, the LinearOp hook, pooling, BN masking."""
import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.models import layers as L

RTOL, ATOL = 1e-4, 1e-4


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _numpy_conv(x, k, strides, pads):
  """Direct-loop NHWC/HWIO cross-correlation: an independent reference."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  k = np.asarray(k, np.float64)
  kh, kw, _, cout = k.shape
  n, hp, wp, _ = x.shape
  ho, wo = (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1
  out = np.zeros((n, ho, wo, cout))
  for a, b in itertools.product(range(ho), range(wo)):
    win = x[:, a * strides[0]:a * strides[0] + kh, b * strides[1]:b * strides[1] + kw, :]
    out[:, a, b, :] = np.einsum('nijc,ijco->no', win, k)
  return out


# (input HxW, kernel, stride, padding)
CONV_CONFIGS = [
    ((8, 8), 3, 1, 'SAME'),
    ((8, 8), 3, 2, 'SAME'),
    ((9, 7), 3, 2, 'SAME'),
    ((8, 8), 3, 1, 'VALID'),
    ((9, 9), 3, 2, 'VALID'),
    ((7, 7), 5, 1, 'SAME'),
    ((8, 8), 5, 2, 'SAME'),
    ((8, 8), 5, 1, 2),
    ((8, 8), 3, 2, 1),
    ((8, 8), 1, 1, 'SAME'),
    ((8, 8), 1, 2, 'VALID'),
    ((7, 7), 1, 2, 0),
]


@pytest.mark.parametrize('hw,k,s,pad', CONV_CONFIGS)
def test_im2col_matches_lax_and_numpy(hw, k, s, pad):
  x = _normal(0, (2,) + hw + (3,))
  kern = _normal(1, (k, k, 3, 4))
  strides = (s, s)
  r = _normal(2, L.conv_contract_lax(x, kern, strides, pad).shape)

  @jax.jit
  def run(xx, kk):
    out = {}
    for name, fn in (('im2col', L.conv_contract_im2col), ('lax', L.conv_contract_lax)):
      f = lambda a, b: fn(a, b, strides, pad)
      y, vjp = jax.vjp(f, xx, kk)
      out[name] = (y,) + vjp(r)  # grads w.r.t. input and kernel, random cotangent
    return out

  out = run(x, kern)
  (y_i, gx_i, gk_i), (y_l, gx_l, gk_l) = out['im2col'], out['lax']
  pads = L.conv_padding(pad, hw, (k, k), strides)
  y_np = _numpy_conv(x, kern, strides, pads)
  assert y_i.shape == y_l.shape == y_np.shape
  np.testing.assert_allclose(y_i, y_np, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(y_l, y_np, rtol=RTOL, atol=ATOL)
  assert float(jnp.abs(gx_l).max()) > 0 and float(jnp.abs(gk_l).max()) > 0
  np.testing.assert_allclose(gx_i, gx_l, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(gk_i, gk_l, rtol=RTOL, atol=ATOL)


def test_same_padding_convention_matches_xla():
  # Even total padding splits low-first, odd totals put the extra pixel high.
  assert L.conv_padding('SAME', (8, 8), (3, 3), (2, 2)) == ((0, 1), (0, 1))
  assert L.conv_padding('SAME', (7, 7), (5, 5), (1, 1)) == ((2, 2), (2, 2))
  assert L.conv_padding(2, (7, 7), (5, 5), (1, 1)) == ((2, 2), (2, 2))
  with pytest.raises(ValueError):
    L.conv_padding('FULL', (7, 7), (3, 3), (1, 1))


def _conv_modules(k, s, pad, feats=4):
  return (L.Conv(feats, k, strides=s, padding=pad, impl='im2col'),
          L.Conv(feats, k, strides=s, padding=pad, impl='lax'))


@pytest.mark.parametrize('k,s,pad', [(3, 1, 'SAME'), (3, 2, 1), (5, 2, 'VALID')])
def test_conv_module_im2col_vs_lax_under_client_vmap(k, s, pad):
  n_clients = 3
  m_i, m_l = _conv_modules(k, s, pad)
  x = _normal(0, (n_clients, 2, 9, 9, 3))
  keys = jax.random.split(jax.random.key(1), n_clients)
  params = jax.jit(jax.vmap(lambda kk: m_i.init(kk, x[0])))(keys)
  # Non-zero biases so the bias path is exercised.
  params = jax.tree.map(lambda p: p + 0.1 * _normal(5, p.shape), params)
  assert params['params']['kernel'].shape == (n_clients, k, k, 3, 4)

  def client_loss(m):
    def f(p, xx):
      return jnp.sum(jnp.sin(m.apply(p, xx)))
    return f

  vg_i = jax.jit(jax.vmap(jax.value_and_grad(client_loss(m_i), argnums=(0, 1))))
  vg_l = jax.jit(jax.vmap(jax.value_and_grad(client_loss(m_l), argnums=(0, 1))))
  (v_i, (gp_i, gx_i)), (v_l, (gp_l, gx_l)) = vg_i(params, x), vg_l(params, x)
  np.testing.assert_allclose(v_i, v_l, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(gx_i, gx_l, rtol=RTOL, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), gp_i, gp_l)
  # vmapped result equals an explicit per-client loop with the reference impl.
  y_vmap = jax.jit(jax.vmap(m_i.apply))(params, x)
  apply_l = jax.jit(m_l.apply)
  for c in range(n_clients):
    p_c = jax.tree.map(lambda t: t[c], params)
    np.testing.assert_allclose(apply_l(p_c, x[c]), y_vmap[c], rtol=RTOL, atol=ATOL)


def test_conv_and_dense_param_layout_and_errors():
  x = _normal(0, (2, 6, 6, 3))
  v = jax.eval_shape(L.Conv(5, (3, 1), use_bias=False).init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, v['params']) == {'kernel': (3, 1, 3, 5)}
  v = jax.eval_shape(L.Dense(7).init, jax.random.key(0), jnp.ones((2, 4)))
  assert jax.tree.map(jnp.shape, v['params']) == {'kernel': (4, 7), 'bias': (7,)}
  with pytest.raises(ValueError, match='conv_impl'):
    L.Conv(5, impl='fft').init(jax.random.key(0), x)


def test_dense_matches_numpy():
  x = _normal(0, (3, 5, 4))
  m = L.Dense(6)
  p = m.init(jax.random.key(1), x)
  p = jax.tree.map(lambda t: t + 0.3, p)
  want = np.asarray(x) @ np.asarray(p['params']['kernel']) + np.asarray(p['params']['bias'])
  np.testing.assert_allclose(m.apply(p, x), want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------- LinearOp hook


def zero_kernel_op(module, contract, x, kernel):
  return contract(x, kernel * 0.0)


@dataclasses.dataclass(frozen=True)
class ScaleOp:
  scale: float

  def __call__(self, module, contract, x, kernel):
    return contract(x, self.scale * kernel)


def threshold_state_op(module, contract, x, kernel):
  """Writes a per-layer value into a 'sparse_state' collection, as SparsyFed would."""
  thr = module.variable('sparse_state', 'threshold', lambda: jnp.float32(-1.0))
  if module.is_mutable_collection('sparse_state'):
    thr.value = jnp.max(jnp.abs(x))
  return contract(x, kernel)


@pytest.mark.parametrize('impl', L.CONV_IMPLS)
def test_op_hook_is_used(impl):
  x = _normal(0, (2, 6, 6, 3))
  plain = L.Conv(4, 3, impl=impl)
  p = jax.jit(plain.init)(jax.random.key(0), x)
  p = jax.tree.map(lambda t: t + 0.5, p)
  zeroed, scaled = L.Conv(4, 3, impl=impl, op=zero_kernel_op), L.Conv(4, 3, impl=impl,
                                                                      op=ScaleOp(2.0))
  y, y0, y2 = jax.jit(lambda p, x: (plain.apply(p, x), zeroed.apply(p, x),
                                    scaled.apply(p, x)))(p, x)
  # Kernel zeroed inside the op; the bias is still added outside it.
  np.testing.assert_allclose(y0, jnp.broadcast_to(p['params']['bias'], y0.shape), atol=1e-6)
  np.testing.assert_allclose(y2 - p['params']['bias'], 2 * (y - p['params']['bias']),
                             rtol=RTOL, atol=ATOL)
  assert hash(ScaleOp(2.0)) == hash(ScaleOp(2.0))


def test_op_receives_raw_input_and_can_keep_state():
  x = _normal(0, (2, 6, 6, 3))
  seen = []

  def spy(module, contract, xx, kernel):
    seen.append((xx.shape, kernel.shape))
    return contract(xx, kernel)

  m = L.Conv(4, 3, strides=2, op=spy)
  p = jax.eval_shape(m.init, jax.random.key(0), x)
  assert seen[-1] == ((2, 6, 6, 3), (3, 3, 3, 4))  # raw NHWC input, not patches

  m = L.Dense(3, op=threshold_state_op)
  v = m.init(jax.random.key(0), x)
  assert float(v['sparse_state']['threshold']) == pytest.approx(float(jnp.abs(x).max()))
  _, st = m.apply({'params': v['params'], 'sparse_state': v['sparse_state']}, 2 * x,
                  mutable=['sparse_state'])
  assert float(st['sparse_state']['threshold']) == pytest.approx(2 * float(jnp.abs(x).max()))
  del p


# --------------------------------------------------------------------------- Pooling


def _numpy_max_pool(x, w, s):
  x = np.asarray(x)
  n, h, wd, c = x.shape
  ho, wo = (h - w) // s + 1, (wd - w) // s + 1
  out = np.empty((n, ho, wo, c), x.dtype)
  for a, b in itertools.product(range(ho), range(wo)):
    out[:, a, b] = x[:, a * s:a * s + w, b * s:b * s + w].max(axis=(1, 2))
  return out


@pytest.mark.parametrize('hw,window,stride', [((8, 8), 2, 2), ((7, 9), 2, 2),
                                               ((9, 9), 3, 2), ((8, 8), 3, 3)])
def test_max_pool_variants_agree(hw, window, stride):
  x = _normal(0, (2,) + hw + (3,))  # continuous random values: no ties
  ref = lambda t: nn.max_pool(t, (window, window), (stride, stride), padding='VALID')
  ours = lambda t: L.max_pool(t, window, stride)
  y = jax.jit(ours)(x)
  np.testing.assert_allclose(y, _numpy_max_pool(x, window, stride))
  np.testing.assert_allclose(y, jax.jit(ref)(x))
  r = _normal(1, y.shape)
  g = jax.jit(jax.grad(lambda t: jnp.sum(ours(t) * r)))(x)
  g_ref = jax.jit(jax.grad(lambda t: jnp.sum(ref(t) * r)))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_max_pool_extra_leading_axes():
  x = _normal(0, (3, 2, 8, 8, 4))
  np.testing.assert_allclose(L.max_pool(x), jax.vmap(L.max_pool)(x))


# ------------------------------------------------------------------------- BatchNorm


class _BN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False, example_mask=None):
    return L.batch_norm(x, name='bn', train=train, example_mask=example_mask)


def _bn_setup():
  m = _BN()
  x = _normal(0, (6, 4, 4, 5)) * 3.0 + 1.0
  v = m.init(jax.random.key(0), x)
  v = {'params': jax.tree.map(lambda t: t + 0.25 * _normal(3, t.shape), v['params']),
       'batch_stats': {'bn': {'mean': _normal(4, (5,)), 'var': 1.0 + jnp.abs(_normal(5, (5,)))}}}
  return m, x, v


def test_batch_norm_mask_ignores_padded_rows():
  m, x, v = _bn_setup()
  mask = jnp.array([1, 0, 1, 1, 0, 1], jnp.float32)
  real = np.asarray(mask).astype(bool)
  # Padded rows hold garbage that would shift the statistics.
  x_pad = jnp.where(mask[:, None, None, None] > 0, x, 100.0)
  y, st = m.apply(v, x_pad, train=True, example_mask=mask, mutable=['batch_stats'])
  y_ref, st_ref = m.apply(v, x[real], train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y[real], y_ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               st, st_ref)
  # Independent numpy reference for the running-average update (momentum 0.9).
  xr = np.asarray(x[real], np.float64)
  mean, var = xr.mean(axis=(0, 1, 2)), xr.var(axis=(0, 1, 2))
  old = v['batch_stats']['bn']
  np.testing.assert_allclose(st['batch_stats']['bn']['mean'],
                             0.9 * np.asarray(old['mean']) + 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st['batch_stats']['bn']['var'],
                             0.9 * np.asarray(old['var']) + 0.1 * var, rtol=1e-5, atol=1e-5)
  # A bool mask means the same; an all-ones mask equals no mask.
  y_b, _ = m.apply(v, x_pad, train=True, example_mask=mask > 0, mutable=['batch_stats'])
  np.testing.assert_allclose(y_b, y, rtol=1e-6)
  y1, st1 = m.apply(v, x, train=True, example_mask=jnp.ones(6), mutable=['batch_stats'])
  y2, st2 = m.apply(v, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-6)


def test_batch_norm_all_padded_batch_keeps_running_stats():
  m, x, v = _bn_setup()
  y, st = m.apply(v, x, train=True, example_mask=jnp.zeros(6), mutable=['batch_stats'])
  assert bool(jnp.all(jnp.isfinite(y)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), st['batch_stats'],
               v['batch_stats'])


def test_batch_norm_eval_uses_running_stats_and_ignores_mask():
  m, x, v = _bn_setup()
  y = m.apply(v, x, train=False, example_mask=jnp.zeros(6))
  s = v['batch_stats']['bn']
  p = v['params']['bn']
  want = (x - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)

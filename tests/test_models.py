"""Model zoo tests: paper parameter counts, layer names, forward shapes, the op hook,
im2col vs lax equivalence at model level, BN masking and dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import models
from sparsefl_jax.models import count_params, get_model, input_shape_for

RNGS = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
# Executed (not just traced) tests use small images where the model allows it; the
# conv/pool stacks are size-agnostic, only fc1's fan-in changes. Keeps compiles short.
SMALL_SHAPES = {'cifar_cnn': (8, 8, 3), 'leaf_cnn': (12, 12, 1), 'small_cnn': (12, 12, 1)}


def _small_shape(name):
  return SMALL_SHAPES.get(name, input_shape_for(name))


def _abstract_init(model, shape, batch=2):
  x = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)
  return jax.eval_shape(lambda xx: model.init(RNGS, xx), x)


# (name, num_classes, trainable params, BN statistics) from the papers / spec.
PAPER_COUNTS = [
    ('linear', 10, 784 * 10 + 10, 0),
    ('fmnist_fc', 10, 118_282, 0),
    ('small_cnn', 62, 213_630, 0),
    ('leaf_cnn', 62, 6_603_710, 0),
    ('cifar_cnn', 10, 1_609_930, 384),
    ('resnet18', 10, 11_173_962, 9_600),
    ('vgg16', 100, 14_774_436, 8_448),
]


@pytest.mark.parametrize('name,num_classes,n_params,n_stats', PAPER_COUNTS)
def test_parameter_counts_match_papers(name, num_classes, n_params, n_stats):
  v = _abstract_init(get_model(name, num_classes), input_shape_for(name))
  assert count_params(v['params']) == n_params
  assert count_params(v.get('batch_stats', {})) == n_stats
  if name == 'vgg16':  # FedSparsify counts BN statistics too.
    assert count_params(v['params']) + n_stats == 14_782_884


def _kernel_paths(params):
  paths = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(p.key for p in path)
    if keys[-1] == 'kernel':
      paths.add(keys[:-1])
  return paths


def test_layer_names_are_stable():
  p = _abstract_init(get_model('resnet18', 10), (32, 32, 3))['params']
  paths = _kernel_paths(p)
  assert ('stem',) in paths and ('fc',) in paths
  assert ('layer1_0', 'conv1') in paths and ('layer4_1', 'conv2') in paths
  assert ('layer2_0', 'shortcut') in paths and ('layer1_0', 'shortcut') not in paths
  assert len(paths) == 1 + 16 + 3 + 1  # stem, 16 block convs, 3 shortcuts, fc
  assert 'bias' not in p['stem'] and 'bias' in p['fc']
  assert set(p['layer2_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'shortcut', 'shortcut_bn'}

  p = _abstract_init(get_model('cifar_cnn', 10), (32, 32, 3))['params']
  assert set(p) == {f'conv{i}' for i in range(1, 7)} | {'bn1', 'bn2', 'fc1', 'fc2'}
  p = _abstract_init(get_model('vgg16', 100), (32, 32, 3))['params']
  assert set(p) == ({f'conv{i}' for i in range(1, 14)} | {f'bn{i}' for i in range(1, 14)}
                    | {'fc'})
  assert set(_abstract_init(get_model('leaf_cnn', 62), (28, 28, 1))['params']) == {
      'conv1', 'conv2', 'fc1', 'fc2'}
  assert set(_abstract_init(get_model('fmnist_fc', 10), (28, 28, 1))['params']) == {
      'fc1', 'fc2', 'fc3'}


def test_registry_errors_and_shapes():
  assert set(models.MODELS) == {'linear', 'mlp_small', 'fmnist_fc', 'small_cnn',
                                'cifar_cnn', 'leaf_cnn', 'resnet18', 'vgg16'}
  with pytest.raises(ValueError, match=r"'alexnet'.*resnet18"):
    get_model('alexnet', 10)
  with pytest.raises(ValueError, match=r"'winograd'.*im2col"):
    get_model('small_cnn', 10, conv_impl='winograd')
  with pytest.raises(ValueError, match='alexnet'):
    input_shape_for('alexnet')
  assert input_shape_for('fmnist_fc') == (28, 28, 1)
  assert input_shape_for('leaf_cnn') == (28, 28, 1)
  for name in ('cifar_cnn', 'resnet18', 'vgg16'):
    assert input_shape_for(name) == (32, 32, 3)
  m = get_model('leaf_cnn', 62, conv_impl='lax')
  assert m.conv_impl == 'lax' and m.op is None


def test_count_params_on_arrays():
  tree = {'a': jnp.zeros((3, 4)), 'b': [jnp.zeros(5), jnp.zeros(())]}
  assert count_params(tree) == 18


# ----------------------------------------------------------------------------- Forward

FAST_MODELS = ['linear', 'mlp_small', 'fmnist_fc', 'small_cnn', 'cifar_cnn', 'leaf_cnn']


@pytest.mark.parametrize('name', FAST_MODELS)
def test_forward_shapes_train_and_eval(name):
  nc = 7
  model = get_model(name, nc)
  x = jax.random.normal(jax.random.key(2), (2,) + _small_shape(name))
  v = jax.jit(model.init)(RNGS, x)

  @jax.jit
  def run(v, x):
    y_eval = model.apply(v, x, train=False)
    y_train, _ = model.apply(v, x, train=True, example_mask=jnp.array([1.0, 1.0]),
                             rngs={'dropout': jax.random.key(3)}, mutable=['batch_stats'])
    return y_eval, y_train

  y_eval, y_train = run(v, x)
  assert y_eval.shape == y_train.shape == (2, nc)
  assert bool(jnp.all(jnp.isfinite(y_eval))) and bool(jnp.all(jnp.isfinite(y_train)))


@pytest.mark.parametrize('name,nc', [('resnet18', 10), ('vgg16', 100)])
def test_big_model_forward_shapes_abstract(name, nc):
  """Traced (not executed) to keep the suite fast; checks shapes and state updates."""
  model = get_model(name, nc)
  x = jax.ShapeDtypeStruct((2,) + input_shape_for(name), jnp.float32)
  v = _abstract_init(model, input_shape_for(name))
  y = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert y.shape == (2, nc)
  y, st = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, example_mask=jnp.ones(2),
                               mutable=['batch_stats']), v, x)
  assert y.shape == (2, nc)
  assert jax.tree.map(lambda s: s.shape, st['batch_stats']) == jax.tree.map(
      lambda s: s.shape, v['batch_stats'])


# --------------------------------------------------------------------------- Op hook

SEEN = []


def recording_op(module, contract, x, kernel):
  SEEN.append(tuple(module.path))
  return contract(x, kernel)


def zero_op(module, contract, x, kernel):
  return contract(x, jnp.zeros_like(kernel))


@pytest.mark.parametrize('name', ['cifar_cnn', 'resnet18', 'vgg16', 'leaf_cnn', 'fmnist_fc'])
def test_op_sees_every_weight_layer(name):
  SEEN.clear()
  v = _abstract_init(get_model(name, 10, op=recording_op), input_shape_for(name))
  assert set(SEEN) == _kernel_paths(v['params'])
  assert len(SEEN) == len(set(SEEN))  # each layer once per call


@pytest.mark.parametrize('name', ['small_cnn', 'cifar_cnn', 'mlp_small'])
def test_zero_op_changes_every_model_output(name):
  x = jax.random.normal(jax.random.key(2), (2,) + _small_shape(name))
  plain = get_model(name, 5)
  v = jax.jit(plain.init)(RNGS, x)
  zeroed = get_model(name, 5, op=zero_op)
  y, y0 = jax.jit(lambda v, x: (plain.apply(v, x), zeroed.apply(v, x)))(v, x)
  # All kernels zeroed in the op: logits collapse to the last layer's (zero) bias.
  assert float(jnp.abs(y).max()) > 1e-3
  np.testing.assert_allclose(y0, jnp.broadcast_to(v['params'][_last(v)]['bias'], y0.shape),
                             atol=1e-6)


def _last(v):
  return sorted(k for k in v['params'] if k.startswith('fc'))[-1]


# --------------------------------------------------------- im2col vs lax, model level


@pytest.mark.parametrize('name', ['small_cnn', 'cifar_cnn'])
def test_model_im2col_matches_lax_values_and_grads(name):
  x = jax.random.normal(jax.random.key(4), (3,) + _small_shape(name))
  labels = jnp.array([0, 1, 2])
  m_i, m_l = get_model(name, 4, conv_impl='im2col'), get_model(name, 4, conv_impl='lax')
  v = jax.jit(m_i.init)(RNGS, x)

  def loss(model):
    def f(params, stats):
      logits, new = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                rngs={'dropout': jax.random.key(5)}, mutable=['batch_stats'])
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
      return ce, new
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  stats = v.get('batch_stats', {})
  (l_i, s_i), g_i = loss(m_i)(v['params'], stats)
  (l_l, s_l), g_l = loss(m_l)(v['params'], stats)
  np.testing.assert_allclose(l_i, l_l, rtol=1e-5)
  # float32 rounding differs between the two conv algorithms and grows through BN.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=2e-3 * float(jnp.abs(b).max())), g_i, g_l)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), s_i, s_l)


def test_small_cnn_vmap_over_clients_in_scan_matches_loop():
  """The engine's pattern: clients vmapped, local SGD steps in lax.scan."""
  n_clients, steps = 3, 2
  model = get_model('small_cnn', 5)
  xs = jax.random.normal(jax.random.key(6), (n_clients, steps, 4, 12, 12, 1))
  ys = jax.random.randint(jax.random.key(7), (n_clients, steps, 4), 0, 5)
  params = jax.jit(jax.vmap(lambda k: model.init(k, xs[0, 0])['params']))(
      jax.random.split(jax.random.key(8), n_clients))

  def local(p, x, y, model):
    def step(p, batch):
      bx, by = batch
      def loss(p):
        logits = model.apply({'params': p}, bx)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), by[:, None], 1))
      g = jax.grad(loss)(p)
      return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None
    return jax.lax.scan(step, p, (x, y))[0]

  out = jax.jit(jax.vmap(lambda p, x, y: local(p, x, y, model)))(params, xs, ys)
  ref_model = get_model('small_cnn', 5, conv_impl='lax')
  ref_local = jax.jit(lambda p, x, y: local(p, x, y, ref_model))
  for c in range(n_clients):
    ref = ref_local(jax.tree.map(lambda t: t[c], params), xs[c], ys[c])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[c], b, rtol=1e-4, atol=1e-5),
                 out, ref)


# ---------------------------------------------------------------- BN mask and dropout


def test_cifar_cnn_example_mask_matches_running_on_real_rows():
  model = get_model('cifar_cnn', 10)
  x = jax.random.normal(jax.random.key(9), (4, 8, 8, 3))
  mask = jnp.array([1.0, 0.0, 1.0, 0.0])
  x_pad = jnp.where(mask[:, None, None, None] > 0, x, 50.0)
  v = jax.jit(model.init)(RNGS, x)
  # Dropout off, so masked and unmasked train-mode runs are comparable row-wise.
  model_nodrop = model.clone(dropout_rate=0.0)
  y, st = jax.jit(lambda v, x, m: model_nodrop.apply(
      v, x, train=True, example_mask=m, mutable=['batch_stats']))(v, x_pad, mask)
  y_ref, st_ref = jax.jit(lambda v, x: model_nodrop.apply(
      v, x, train=True, mutable=['batch_stats']))(v, x[np.array([0, 2])])
  np.testing.assert_allclose(y[np.array([0, 2])], y_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), st, st_ref)
  # Without the mask the padding would shift the statistics.
  _, st_bad = jax.jit(lambda v, x: model_nodrop.apply(
      v, x, train=True, mutable=['batch_stats']))(v, x_pad)
  assert not np.allclose(st_bad['batch_stats']['bn1']['mean'],
                         st_ref['batch_stats']['bn1']['mean'])


def test_dropout_only_in_train():
  model = get_model('cifar_cnn', 10)
  x = jax.random.normal(jax.random.key(10), (2, 8, 8, 3))
  v = jax.jit(model.init)(RNGS, x)
  f = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={'dropout': k},
                                          mutable=['batch_stats'])[0])
  a, b = f(v, x, jax.random.key(1)), f(v, x, jax.random.key(2))
  assert not np.allclose(a, b)
  g = jax.jit(lambda v, x: model.apply(v, x, train=False))
  np.testing.assert_array_equal(g(v, x), g(v, x))
  with pytest.raises(Exception):  # train needs a 'dropout' rng (traced only: fast)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), v, x)

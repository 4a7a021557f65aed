"""On-device preprocessing against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.data import SyntheticSpec, build_federated_dataset
from sparsefl_jax.data.preprocess import (crop_and_flip, crop_flip, make_batch_fn,
                                          normalize)


def np_crop_flip(x, offsets, flips, pad):
  """Reference: explicit zero-pad, slice and mirror per example."""
  b, h, w, _ = x.shape
  padded = np.zeros((b, h + 2 * pad, w + 2 * pad, x.shape[3]), x.dtype)
  padded[:, pad:pad + h, pad:pad + w] = x
  out = np.empty_like(x)
  for i in range(b):
    r, c = offsets[i]
    crop = padded[i, r:r + h, c:c + w]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


def test_normalize_uint8_and_float_against_numpy(images):
  mean = np.array([0.2, 0.4, 0.6], np.float32)
  std = np.array([0.5, 0.25, 0.1], np.float32)
  want = (images.astype(np.float64) / 255.0 - mean) / std
  got = jax.jit(normalize)(images, mean, std)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  f = images.astype(np.float32) / 255.0  # Float input is not rescaled again.
  np.testing.assert_allclose(np.asarray(normalize(f, mean, std)), want, rtol=1e-5,
                             atol=1e-5)


def test_crop_with_center_offset_and_no_flip_is_identity(images):
  offsets = np.full((6, 2), 4)
  out = crop_and_flip(jnp.asarray(images), offsets, np.zeros(6, bool), 4)
  np.testing.assert_array_equal(np.asarray(out), images)


def test_crop_mechanics_match_numpy(images):
  rng = np.random.default_rng(1)
  offsets = rng.integers(0, 9, (6, 2))
  offsets[0] = (0, 0)
  offsets[1] = (8, 8)
  flips = rng.random(6) < 0.5
  flips[:2] = (False, True)
  got = jax.jit(crop_and_flip, static_argnums=3)(jnp.asarray(images), offsets, flips, 4)
  np.testing.assert_array_equal(np.asarray(got), np_crop_flip(images, offsets, flips, 4))


def test_crop_flip_deterministic_per_key_and_varies(images):
  x = jnp.asarray(np.repeat(images[:1], 64, axis=0))
  k1, k2 = jax.random.key(0), jax.random.key(1)
  a, b, c = crop_flip(x, k1), crop_flip(x, k1), crop_flip(x, k2)
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  # Same source image, per-example randomness: many distinct outputs.
  assert len({np.asarray(r).tobytes() for r in a}) > 10
  # Every output is one of the 9*9*2 reference crops of the source.
  src = images[:1]
  refs = {np_crop_flip(src, np.array([[r, cc]]), np.array([f]), 4)[0].tobytes()
          for r in range(9) for cc in range(9) for f in (False, True)}
  assert all(np.asarray(r).tobytes() in refs for r in a)


def test_crop_flip_rejects_non_batch():
  with pytest.raises(ValueError, match="NHWC"):
    crop_flip(jnp.zeros((8, 8, 3)), jax.random.key(0))


def test_make_batch_fn_augments_only_when_asked():
  spec = SyntheticSpec(example_shape=(8, 8, 3), examples_per_client=16, num_test=4)
  ds = build_federated_dataset("synthetic", num_clients=2, synthetic=spec)
  x = jnp.asarray(ds.train_x[0])
  key = jax.random.key(3)
  plain = normalize(x, ds.mean, ds.std)
  fn = jax.jit(make_batch_fn(ds), static_argnums=2)
  np.testing.assert_allclose(np.asarray(fn(x, key, True)), np.asarray(plain), rtol=1e-6)
  aug_ds = type(ds)(**{**ds.__dict__, "augment": "crop_flip"})
  afn = jax.jit(make_batch_fn(aug_ds), static_argnums=2)
  want = normalize(crop_flip(x, key), ds.mean, ds.std)
  np.testing.assert_allclose(np.asarray(afn(x, key, True)), np.asarray(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(afn(x, key, False)), np.asarray(plain), rtol=1e-6)

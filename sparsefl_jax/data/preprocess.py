"""On-device preprocessing, pure jnp and jittable (runs inside the local step).

Augmentation randomness comes only from the key passed in, so a round stays
deterministic given its step key.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.data.federated import FederatedDataset


def to_unit_float(x: jnp.ndarray) -> jnp.ndarray:
  """uint8 -> float32 in [0, 1]; float input is cast to float32 unchanged."""
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def normalize(x: jnp.ndarray, mean, std) -> jnp.ndarray:
  """(to_unit_float(x) - mean) / std per channel (the last axis), float32."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (to_unit_float(x) - mean) / std


def crop_and_flip(x: jnp.ndarray, offsets: jnp.ndarray, flips: jnp.ndarray,
                  pad: int = 4) -> jnp.ndarray:
  """Zero-pad H and W by `pad`, crop HxW at per-example `offsets`, then flip.

  Args:
    x: (B, H, W, C) batch.
    offsets: (B, 2) int crop origins (row, col) in 0..2*pad of the padded image;
      (pad, pad) is the un-shifted image.
    flips: (B,) bool, True flips that example left-right.
    pad: zero padding on each side.
  """
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(img, off, flip):
    crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1, :], crop)

  return jax.vmap(one)(padded, offsets.astype(jnp.int32), flips)


def crop_flip(x: jnp.ndarray, key: jax.Array, pad: int = 4) -> jnp.ndarray:
  """CIFAR augmentation: pad 4, random HxW crop, random horizontal flip.

  Each example gets its own offset (uniform in 0..2*pad per axis) and a fair
  coin for the flip, all drawn from `key`. Shape and dtype are kept.
  """
  if x.ndim != 4:
    raise ValueError(f"crop_flip expects a NHWC batch, got shape {x.shape}")
  k_off, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_off, (x.shape[0], 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (x.shape[0],))
  return crop_and_flip(x, offsets, flips, pad)


def make_batch_fn(ds: FederatedDataset
                  ) -> Callable[[jnp.ndarray, jax.Array, bool], jnp.ndarray]:
  """Returns batch_fn(x, key, train) -> normalised float32 batch.

  Augments (before normalising, so padding is black as in torchvision) only
  when `train` is True and the dataset asks for it. `train` must be a Python
  bool (static under jit).
  """
  mean = np.asarray(ds.mean, np.float32)
  std = np.asarray(ds.std, np.float32)
  augment = ds.augment

  def batch_fn(x: jnp.ndarray, key: jax.Array, train: bool) -> jnp.ndarray:
    if train and augment == "crop_flip":
      x = crop_flip(x, key)
    return normalize(x, mean, std)

  return batch_fn

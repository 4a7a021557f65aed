"""TF-free TFDS loading: `tfds.data_source` (array_record) into numpy arrays.

A user with internet gets the dataset by name (TFDS downloads and prepares
it); a user offline needs a `data_dir` where it was prepared as array_record.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

_CHUNK = 4096


def hide_accelerators_from_tf() -> None:
  """If TensorFlow is installed, keep it off GPUs/TPUs: JAX owns them."""
  if importlib.util.find_spec("tensorflow") is None:
    return
  import tensorflow as tf
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialised or unknown kind.
      pass


def read_source(source, x_key: str, y_key: str,
                batch_fn: Optional[Callable[[list], np.ndarray]] = None,
                ) -> tuple[np.ndarray, np.ndarray]:
  """Read a whole TFDS random-access data source into (x, y) numpy arrays.

  Reads in chunks; `batch_fn` turns a chunk's list of raw x values into one
  array (default `np.stack`; e.g. padding + MFCC for variable-length audio).
  Uses batched reads where the source supports them, and item-by-item reads
  otherwise (mocked sources break on `__getitems__`).
  """
  batch_fn = batch_fn or np.stack
  n = len(source)
  if n == 0:
    raise ValueError("the data source is empty")
  xs, ys = [], np.empty(n, np.int32)
  batched = hasattr(source, "__getitems__")
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(start + _CHUNK, n)))
    items = None
    if batched:
      try:
        items = source.__getitems__(keys)
      except TypeError:
        batched = False
    if items is None:
      items = [source[i] for i in keys]
    xs.append(batch_fn([np.asarray(item[x_key]) for item in items]))
    ys[start:start + len(keys)] = [int(item[y_key]) for item in items]
  return np.concatenate(xs), ys


def load_split(name: str, split: str, data_dir: Optional[str], x_key: str,
               y_key: str, batch_fn: Optional[Callable[[list], np.ndarray]] = None,
               ) -> tuple[np.ndarray, np.ndarray]:
  """One split of a TFDS dataset as numpy arrays, TF-free."""
  import tensorflow_datasets as tfds
  hide_accelerators_from_tf()
  t0 = time.perf_counter()
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  x, y = read_source(src, x_key, y_key, batch_fn)
  log.info("loaded %s[%s] (%d examples) in %.1f s", name, split, len(y),
           time.perf_counter() - t0)
  return x, y


def load_train_test(name: str, data_dir: Optional[str] = None, x_key: str = "image",
                    y_key: str = "label",
                    batch_fn: Optional[Callable[[list], np.ndarray]] = None):
  """Returns (train_x, train_y, test_x, test_y) for a TFDS dataset by name."""
  data_dir = data_dir or os.environ.get("SPARSEFL_DATA_DIR")
  train_x, train_y = load_split(name, "train", data_dir, x_key, y_key, batch_fn)
  test_x, test_y = load_split(name, "test", data_dir, x_key, y_key, batch_fn)
  return train_x, train_y, test_x, test_y

"""sklearn's bundled 8x8 digits: a small real dataset for fast tests (no TFDS, no TF)."""
from __future__ import annotations

import numpy as np

NUM_TEST = 297  # Leaves 1500 training examples, divisible by many client counts.
_SPLIT_SEED = 0  # The split is fixed, independent of data_seed.


def load_digits_arrays():
  """Returns (train_x, train_y, test_x, test_y): (N, 8, 8, 1) uint8 in 0..255.

  The 1797 UCI optdigits images (pixel values 0..16) are rescaled to 0..255
  and split once, with a fixed seed, into 1500 train and 297 test examples.
  """
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:  # pragma: no cover
    raise ImportError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from e
  d = load_digits()
  x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(_SPLIT_SEED).permutation(y.size)
  test, train = perm[:NUM_TEST], perm[NUM_TEST:]
  return x[train], y[train], x[test], y[test]

"""Dataset registry: loads a named dataset into centralised numpy arrays."""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Optional

import numpy as np

from sparsefl_jax.data import fashion_mnist, small, speech, synthetic, tfds_loader
from sparsefl_jax.data.federated import DatasetNotFoundError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset: classes, augmentation and TFDS keys."""
  num_classes: int
  augment: str = "none"
  tfds_name: Optional[str] = None  # Loaded through tfds.data_source.
  x_key: str = "image"
  y_key: str = "label"
  batch_fn: Optional[Callable[[list], np.ndarray]] = None


def _speech_batch(waves: list) -> np.ndarray:
  """Zero-pad a chunk of variable-length clips to 1 s and featurise them."""
  fixed = np.zeros((len(waves), speech.NUM_SAMPLES), np.int16)
  for i, w in enumerate(waves):
    w = np.asarray(w).reshape(-1)[:speech.NUM_SAMPLES]
    fixed[i, :w.size] = w
  return speech.mfcc_like(fixed)


INFO = {
    "fashion_mnist": DatasetInfo(10),
    "mnist": DatasetInfo(10, tfds_name="mnist"),
    "cifar10": DatasetInfo(10, "crop_flip", tfds_name="cifar10"),
    "cifar100": DatasetInfo(100, "crop_flip", tfds_name="cifar100"),
    # TFDS stores EMNIST images transposed relative to MNIST; kept as is.
    "emnist/byclass": DatasetInfo(62, tfds_name="emnist/byclass"),
    "emnist/balanced": DatasetInfo(47, tfds_name="emnist/balanced"),
    "speech_commands": DatasetInfo(12, tfds_name="speech_commands", x_key="audio",
                                   batch_fn=_speech_batch),
    "digits": DatasetInfo(10),
    "synthetic": DatasetInfo(10),
}


@dataclasses.dataclass(frozen=True)
class RawData:
  """A centralised dataset before partitioning; x has a trailing channel axis."""
  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  augment: str = "none"
  groups: Optional[np.ndarray] = None  # Per-train-example id for 'natural'.


def _with_channel(x: np.ndarray) -> np.ndarray:
  return x[..., None] if x.ndim == 3 else x


def load_raw(name: str, *, num_clients: int, data_seed: int = 0,
             data_dir: Optional[str] = None,
             spec: Optional[synthetic.SyntheticSpec] = None) -> RawData:
  """Load dataset `name` (a key of INFO) into numpy."""
  if name not in INFO:
    raise ValueError(f"unknown dataset {name!r}; choose one of {tuple(INFO)}")
  info = INFO[name]
  groups = None
  num_classes = info.num_classes
  if name == "fashion_mnist":
    arrays = fashion_mnist.load_arrays(data_dir)
  elif name == "digits":
    arrays = small.load_digits_arrays()
  elif name == "synthetic":
    spec = spec or synthetic.SyntheticSpec()
    *arrays, groups = synthetic.make_synthetic(spec, num_clients, data_seed)
    num_classes = spec.num_classes
  else:
    if name == "speech_commands" and importlib.util.find_spec("tensorflow") is None:
      raise DatasetNotFoundError(
          "speech_commands needs TensorFlow (TFDS's Audio feature imports it): "
          "pip install tensorflow-cpu; sparsefl_jax keeps it off accelerators")
    arrays = tfds_loader.load_train_test(info.tfds_name, data_dir, info.x_key,
                                         info.y_key, info.batch_fn)
  train_x, train_y, test_x, test_y = arrays
  return RawData(_with_channel(train_x), train_y.astype(np.int32),
                 _with_channel(test_x), test_y.astype(np.int32), num_classes,
                 info.augment, groups)

"""TFDS datasets through tfds.data_source, with tfds.testing.mock_data (no network)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparsefl_jax.data import build_federated_dataset
from sparsefl_jax.data.tfds_loader import read_source


@pytest.mark.parametrize("name,shape,classes,augment", [
    ("mnist", (28, 28, 1), 10, "none"),
    ("cifar10", (32, 32, 3), 10, "crop_flip"),
])
def test_tfds_dataset_via_mock(tmp_path, name, shape, classes, augment):
  with tfds.testing.mock_data(num_examples=24):
    ds = build_federated_dataset(name, num_clients=4, data_dir=str(tmp_path))
    ref = tfds.data_source(name, split="train", data_dir=str(tmp_path))
    ref_x = np.stack([ref[i]["image"] for i in range(len(ref))])
    ref_y = np.array([ref[i]["label"] for i in range(len(ref))])
  assert ds.example_shape == shape and ds.train_x.dtype == np.uint8
  assert ds.num_classes == classes and ds.augment == augment
  assert int(ds.counts.sum()) == 24 and ds.test_x.shape == (24,) + shape
  got = {(x.tobytes(), int(y)) for i in range(4)
         for x, y in zip(ds.train_x[i, :ds.counts[i]], ds.train_y[i, :ds.counts[i]])}
  assert got == {(x.tobytes(), int(y)) for x, y in zip(ref_x, ref_y)}
  scaled = ref_x.reshape(-1, shape[-1]) / 255.0
  np.testing.assert_allclose(ds.mean, scaled.mean(0), rtol=1e-5)
  np.testing.assert_allclose(ds.std, scaled.std(0), rtol=1e-5)


class _Source:
  """A minimal random-access source; optionally with a batched read."""

  def __init__(self, items, batched):
    self.items = items
    if batched:
      self.__getitems__ = lambda keys: [items[k] for k in keys]

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


@pytest.mark.parametrize("batched", [True, False])
def test_read_source_chunks(monkeypatch, batched):
  from sparsefl_jax.data import tfds_loader
  monkeypatch.setattr(tfds_loader, "_CHUNK", 3)
  items = [{"image": np.full((2, 2), i, np.uint8), "label": i % 3} for i in range(8)]
  x, y = read_source(_Source(items, batched), "image", "label")
  np.testing.assert_array_equal(x[:, 0, 0], np.arange(8))
  np.testing.assert_array_equal(y, np.arange(8) % 3)
  assert y.dtype == np.int32

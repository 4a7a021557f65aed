"""Fashion-MNIST offline: verification, TF-free TFDS builder, end to end."""
import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest

from sparsefl_jax.data import DatasetNotFoundError, build_federated_dataset
from sparsefl_jax.data import fashion_mnist as fm

SRC = fm.find_source_dir()
needs_files = pytest.mark.skipif(
    SRC is None, reason="Fashion-MNIST IDX files absent: apt-get install "
    "dataset-fashion-mnist or set SPARSEFL_FMNIST_DIR")


def read_idx_reference(path):
  """Independent IDX reader (gzip module + struct-free numpy parsing)."""
  with gzip.open(path, "rb") as f:
    b = f.read()
  dims = np.frombuffer(b, ">u4", b[3], 4)
  return np.frombuffer(b, np.uint8, offset=4 + 4 * b[3]).reshape(tuple(dims))


def test_gzip_header_restoration_keeps_payload():
  payload = os.urandom(300)
  raw = gzip.compress(payload, mtime=0)
  raw = raw[:3] + b"\x00" + raw[4:]  # No FNAME, as Debian ships them.
  fixed = fm.restore_gzip_header(raw, "t10k-labels-idx1-ubyte")
  assert fixed[3] == 0x08 and b"t10k-labels-idx1-ubyte\x00" in fixed[:40]
  assert gzip.decompress(fixed) == payload
  assert fm.restore_gzip_header(fixed, "t10k-labels-idx1-ubyte") == fixed
  with pytest.raises(ValueError, match="not a gzip"):
    fm.restore_gzip_header(b"hello world", "x")


def test_tfds_checksums_registered():
  sums = fm.tfds_checksums()
  assert set(sums) == {n + ".gz" for n in fm._MTIME}
  assert all(len(v) == 64 for v in sums.values())


def test_missing_files_give_one_clear_line(tmp_path, monkeypatch):
  monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "nowhere"))
  monkeypatch.delenv(fm.ENV_SOURCE, raising=False)
  with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
    build_federated_dataset("fashion_mnist", num_clients=2, data_dir=str(tmp_path))
  assert "\n" not in str(e.value)
  assert isinstance(e.value, ValueError)


@needs_files
def test_tampered_file_is_rejected(tmp_path):
  for name in fm._MTIME:
    shutil.copy(os.path.join(SRC, name + ".gz"), tmp_path)
  path = tmp_path / "t10k-labels-idx1-ubyte.gz"
  data = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(data[:-1] + bytes([(data[-1] + 1) % 10]), mtime=0))
  with pytest.raises(DatasetNotFoundError, match="checksum"):
    fm.read_verified(str(tmp_path), "t10k-labels-idx1-ubyte")


@needs_files
def test_debian_files_match_tfds_checksums():
  sums = fm.tfds_checksums()
  for name in fm._MTIME:
    with open(os.path.join(SRC, name + ".gz"), "rb") as f:
      fixed = fm.restore_gzip_header(f.read(), name)
    assert hashlib.sha256(fixed).hexdigest() == sums[name + ".gz"]


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.fmnist
@needs_files
def test_fashion_mnist_end_to_end(prepared_dir):
  tx, ty, vx, vy = fm.load_arrays(prepared_dir)
  assert tx.shape == (60000, 28, 28, 1) and vx.shape == (10000, 28, 28, 1)
  assert tx.dtype == np.uint8 and ty.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ty), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(vy), [1000] * 10)
  # Same content as the raw IDX files (TFDS reorders examples when writing).
  ref_x = read_idx_reference(os.path.join(SRC, "train-images-idx3-ubyte.gz"))
  ref_y = read_idx_reference(os.path.join(SRC, "train-labels-idx1-ubyte.gz"))
  for c in range(10):
    np.testing.assert_array_equal(tx[ty == c].sum(0, dtype=np.int64)[..., 0],
                                  ref_x[ref_y == c].sum(0, dtype=np.int64))
  ref_t = read_idx_reference(os.path.join(SRC, "t10k-images-idx3-ubyte.gz"))
  assert (sorted(r.tobytes() for r in vx.reshape(10000, -1)) ==
          sorted(r.tobytes() for r in ref_t.reshape(10000, -1)))
  # Second call reuses the prepared data and does not need the source files.
  ds = build_federated_dataset("fashion_mnist", num_clients=100, partition="lda",
                               alpha=1.0, data_dir=prepared_dir, val_fraction=0.1)
  assert (ds.counts == 540).all() and (ds.val_counts == 60).all()
  assert ds.train_x.dtype == np.uint8 and ds.example_shape == (28, 28, 1)
  assert int(ds.counts.sum() + ds.val_counts.sum()) == 60000
  np.testing.assert_allclose(ds.mean, [0.2860], atol=5e-4)  # Known FMNIST stats.
  np.testing.assert_allclose(ds.std, [0.3530], atol=5e-4)
  assert os.path.isdir(os.path.join(prepared_dir, "fashion_mnist_idx", "1.0.0"))

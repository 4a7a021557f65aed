"""Real Fashion-MNIST offline, without TensorFlow.

Source: the upstream gzipped IDX files, e.g. from Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist). Debian's
build rewrote the gzip headers (no file name, zero mtime); putting the original
header back reproduces the upstream bytes, whose sha256 must equal the
checksums TFDS registers for its own `fashion_mnist` (url_checksums). That
proves the files are the genuine data before anything is prepared.

The builder uses Tensor/ClassLabel features and array_record files, which TFDS
can write and read without TensorFlow (its own `fashion_mnist` builder uses
Image features and tfrecord, which need TF). It is prepared once into a TFDS
data dir and read back through `tfds.builder_from_directory`.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import time
from typing import Optional

import numpy as np

from sparsefl_jax.data.federated import DatasetNotFoundError

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV_SOURCE = "SPARSEFL_FMNIST_DIR"
ENV_DATA = "SPARSEFL_DATA_DIR"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Ankle boot")
# Upstream gzip mtimes (2017-08-31), recovered by matching TFDS's checksums.
_MTIME = {"train-images-idx3-ubyte": 1504176606,
          "train-labels-idx1-ubyte": 1504176606,
          "t10k-images-idx3-ubyte": 1504176627,
          "t10k-labels-idx1-ubyte": 1504176627}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_INSTALL_HINT = (
    "install Debian's package (apt-get install dataset-fashion-mnist), or set "
    f"${ENV_SOURCE} / pass data_dir= to a folder with the four *-ubyte.gz files")


def default_data_dir() -> str:
  """Where prepared TFDS datasets live: $SPARSEFL_DATA_DIR or ~/tensorflow_datasets."""
  return os.environ.get(ENV_DATA) or os.path.expanduser("~/tensorflow_datasets")


def find_source_dir(data_dir: Optional[str] = None) -> Optional[str]:
  """First folder holding all four IDX gz files: data_dir (or its
  fashion-mnist/ subfolder), then $SPARSEFL_FMNIST_DIR, then Debian's."""
  candidates = []
  if data_dir:
    candidates += [data_dir, os.path.join(data_dir, "fashion-mnist")]
  if os.environ.get(ENV_SOURCE):
    candidates.append(os.environ[ENV_SOURCE])
  candidates.append(DEBIAN_DIR)
  for d in candidates:
    if all(os.path.isfile(os.path.join(d, f + ".gz")) for f in _MTIME):
      return d
  return None


def tfds_checksums() -> dict[str, str]:
  """{file name: sha256} from TFDS's registered url_checksums/fashion_mnist.txt."""
  import importlib.resources
  txt = (importlib.resources.files("tensorflow_datasets") / "url_checksums" /
         "fashion_mnist.txt").read_text()
  out = {}
  for line in txt.splitlines():
    fields = line.split("\t")
    if len(fields) >= 3:
      out[fields[0].rsplit("/", 1)[-1]] = fields[2]
  return out


def restore_gzip_header(raw: bytes, name: str) -> bytes:
  """Re-insert the upstream FNAME flag, file name and mtime into a gzip header.

  Only the 10-byte header changes; the deflate stream is untouched. Files
  that already carry a file name (e.g. downloaded from upstream) are returned
  as they are.
  """
  if raw[:3] != b"\x1f\x8b\x08":
    raise ValueError(f"{name}.gz is not a gzip file")
  if raw[3] & 0x08:  # FNAME already present.
    return raw
  if raw[3] != 0:
    raise ValueError(f"{name}.gz has unexpected gzip flags {raw[3]:#x}")
  return (b"\x1f\x8b\x08\x08" + struct.pack("<I", _MTIME[name]) + raw[8:10] +
          name.encode() + b"\0" + raw[10:])


def read_verified(source_dir: str, name: str) -> bytes:
  """Read `name`.gz, verify it against TFDS's sha256 and return the raw IDX bytes."""
  path = os.path.join(source_dir, name + ".gz")
  with open(path, "rb") as f:
    raw = restore_gzip_header(f.read(), name)
  want = tfds_checksums()[name + ".gz"]
  got = hashlib.sha256(raw).hexdigest()
  if got != want:
    raise DatasetNotFoundError(
        f"{path} does not match the upstream Fashion-MNIST checksum "
        f"(sha256 {got[:12]}..., TFDS expects {want[:12]}...); reinstall it: "
        f"{_INSTALL_HINT}")
  return gzip.decompress(raw)


def parse_idx(data: bytes) -> np.ndarray:
  """Decode an uncompressed IDX file of unsigned bytes."""
  if data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError("not an unsigned-byte IDX file")
  ndim = data[3]
  shape = tuple(int(s) for s in np.frombuffer(data, ">u4", ndim, 4))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _builder_class():
  """Define the TFDS builder lazily, so importing this module stays cheap."""
  global _BUILDER
  if _BUILDER is not None:
    return _BUILDER
  import tensorflow_datasets as tfds

  class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from verified local IDX files, TF-free (array_record)."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Fashion-MNIST from local IDX files, Tensor features."}

    def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
      self._source_dir = source_dir
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Fashion-MNIST (Zalando, MIT) read from local IDX files.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
              "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
          }),
          supervised_keys=("image", "label"),
          homepage="https://github.com/zalandoresearch/fashion-mnist",
      )

    def _split_generators(self, dl_manager):
      if self._source_dir is None:
        raise DatasetNotFoundError(f"Fashion-MNIST IDX files not found; {_INSTALL_HINT}")
      return {split: self._generate_examples(split) for split in _FILES}

    def _generate_examples(self, split):
      images_name, labels_name = _FILES[split]
      images = parse_idx(read_verified(self._source_dir, images_name))
      labels = parse_idx(read_verified(self._source_dir, labels_name))
      if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but "
                         f"{labels.shape[0]} labels")
      for i in range(images.shape[0]):
        yield i, {"image": images[i, :, :, None], "label": int(labels[i])}

  _BUILDER = FashionMnistIdx
  return _BUILDER


_BUILDER = None


def prepare(data_dir: Optional[str] = None, source_dir: Optional[str] = None):
  """Prepare (once) and return the built TFDS builder; logs the prepare time."""
  import tensorflow_datasets as tfds
  out_dir = data_dir or default_data_dir()
  builder = _builder_class()(data_dir=out_dir, source_dir=source_dir,
                             file_format="array_record")
  if not builder.is_prepared():
    src = source_dir or find_source_dir(data_dir)
    if src is None:
      raise DatasetNotFoundError(f"Fashion-MNIST not found; {_INSTALL_HINT}")
    builder = _builder_class()(data_dir=out_dir, source_dir=src,
                               file_format="array_record")
    t0 = time.perf_counter()
    tfds.disable_progress_bar()   # one log line below says what happened
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    log.warning("prepared Fashion-MNIST (once) from %s into %s in %.1f s", src,
                builder.data_dir, time.perf_counter() - t0)
  return builder


def load_arrays(data_dir: Optional[str] = None, source_dir: Optional[str] = None):
  """Returns (train_x, train_y, test_x, test_y); x (N, 28, 28, 1) uint8, y int32.

  Prepares the TFDS dataset on first use, then reads it back with
  `tfds.builder_from_directory` (no TensorFlow involved).
  """
  import tensorflow_datasets as tfds
  from sparsefl_jax.data.tfds_loader import read_source
  built = prepare(data_dir, source_dir)
  t0 = time.perf_counter()
  reader = tfds.builder_from_directory(built.data_dir)
  out = []
  for split in ("train", "test"):
    x, y = read_source(reader.as_data_source(split=split), "image", "label")
    out += [x, y]
  log.info("loaded Fashion-MNIST from %s in %.1f s", built.data_dir,
           time.perf_counter() - t0)
  return tuple(out)


def load_arrays_with_tf(data_dir: Optional[str] = None,
                        source_dir: Optional[str] = None):
  """Optional path through TFDS's own `fashion_mnist` builder (needs TensorFlow).

  Writes header-restored copies of the IDX files into a manual dir, so TFDS's
  DownloadManager accepts them against its checksums, and loads with
  `tfds.load(..., batch_size=-1)`.
  """
  try:
    import tensorflow as tf  # noqa: F401
  except ImportError as e:
    raise DatasetNotFoundError("the TF builder path needs TensorFlow "
                               "(pip install tensorflow-cpu); the default "
                               "path does not") from e
  import tensorflow_datasets as tfds
  from sparsefl_jax.data.tfds_loader import hide_accelerators_from_tf
  hide_accelerators_from_tf()
  src = source_dir or find_source_dir(data_dir)
  if src is None:
    raise DatasetNotFoundError(f"Fashion-MNIST not found; {_INSTALL_HINT}")
  out_dir = data_dir or default_data_dir()
  manual = os.path.join(out_dir, "downloads", "manual", "fashion_mnist")
  os.makedirs(manual, exist_ok=True)
  for name in _MTIME:
    with open(os.path.join(src, name + ".gz"), "rb") as f:
      raw = restore_gzip_header(f.read(), name)
    with open(os.path.join(manual, name + ".gz"), "wb") as f:
      f.write(raw)
  ds = tfds.load("fashion_mnist", data_dir=out_dir, batch_size=-1,
                 as_supervised=True, download_and_prepare_kwargs={
                     "download_config": tfds.download.DownloadConfig(
                         manual_dir=manual)})
  out = []
  for split in ("train", "test"):
    x, y = tfds.as_numpy(ds[split])
    out += [np.asarray(x, np.uint8), np.asarray(y, np.int32)]
  return tuple(out)

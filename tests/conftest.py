"""Shared pytest set-up: CPU only, and no test may let TFDS reach the network."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tfds_downloads(monkeypatch):
  """A TFDS download attempt offline burns ~200 s before failing; make it fail at once."""
  try:
    import tensorflow_datasets as tfds  # noqa: F401
    from tensorflow_datasets.core.download import download_manager
  except ImportError:  # pragma: no cover
    return

  def _refuse(*args, **kwargs):
    raise RuntimeError("tests must not download datasets (TFDS download attempted)")

  monkeypatch.setattr(download_manager.DownloadManager, "download", _refuse)
  monkeypatch.setattr(download_manager.DownloadManager, "download_and_extract", _refuse)

"""The label-distribution plot writes a real PNG."""
import matplotlib.image
import numpy as np
import pytest

from sparsefl_jax.plots import plot_label_distribution


@pytest.mark.parametrize("clients,heatmap", [(8, None), (120, None), (5, True)])
def test_writes_png(tmp_path, clients, heatmap):
  counts = np.random.default_rng(0).integers(0, 50, (clients, 10))
  path = tmp_path / "sub" / "labels.png"
  out = plot_label_distribution(counts, str(path), title="t", heatmap=heatmap)
  assert out == str(path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  img = matplotlib.image.imread(str(path))
  assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.05


def test_rejects_bad_counts(tmp_path):
  with pytest.raises(ValueError, match=r"\(clients, classes\)"):
    plot_label_distribution(np.zeros(5), str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match=">= 0"):
    plot_label_distribution(-np.ones((2, 2)), str(tmp_path / "x.png"))

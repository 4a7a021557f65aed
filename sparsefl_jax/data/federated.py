"""The federated dataset: stacked, zero-padded per-client arrays plus counts.

The engine moves these arrays to the device once and indexes them inside the
jitted round, so every client must share one padded shape (P, M, ...).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "crop_flip")
LARGE_BYTES = 1 << 30  # Log a memory estimate above ~1 GB.


class DatasetNotFoundError(ValueError):
  """A dataset's files are missing; the message says what to install or set."""


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
  """Per-client train data stacked on a leading client axis, plus a test set.

  Rows >= counts[p] of client p are zero padding (x and y). Image data stays
  uint8 to save memory; `preprocess.normalize` scales and standardises it on
  the device.
  """
  name: str
  train_x: np.ndarray  # (P, M, *example_shape)
  train_y: np.ndarray  # (P, M) int32
  counts: np.ndarray  # (P,) int32, each >= 1
  test_x: np.ndarray  # (T, *example_shape)
  test_y: np.ndarray  # (T,) int32
  num_classes: int
  mean: np.ndarray  # (C,) float32, of the [0, 1]-scaled data
  std: np.ndarray  # (C,) float32
  augment: str = "none"
  val_x: Optional[np.ndarray] = None  # (P, V, *example_shape)
  val_y: Optional[np.ndarray] = None  # (P, V) int32
  val_counts: Optional[np.ndarray] = None  # (P,) int32
  # Per-client test split (`partition_test=True`), same layout as train.
  client_test_x: Optional[np.ndarray] = None
  client_test_y: Optional[np.ndarray] = None
  client_test_counts: Optional[np.ndarray] = None

  def __post_init__(self):
    _check_stacked("train", self.train_x, self.train_y, self.counts,
                   require_nonempty=True)
    p = self.train_x.shape[0]
    if self.test_x.shape[1:] != self.example_shape:
      raise ValueError(f"test_x example shape {self.test_x.shape[1:]} != "
                       f"train example shape {self.example_shape}")
    if self.test_x.dtype != self.train_x.dtype:
      raise ValueError(f"test_x dtype {self.test_x.dtype} != train_x dtype "
                       f"{self.train_x.dtype}")
    if self.test_y.shape != self.test_x.shape[:1] or self.test_y.dtype != np.int32:
      raise ValueError(f"test_y must be int32 of shape {self.test_x.shape[:1]}, "
                       f"got {self.test_y.dtype} {self.test_y.shape}")
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
    channels = self.example_shape[-1] if self.example_shape else 1
    for field in ("mean", "std"):
      v = getattr(self, field)
      if v.shape != (channels,) or v.dtype != np.float32:
        raise ValueError(f"{field} must be float32 of shape ({channels},), "
                         f"got {v.dtype} {v.shape}")
    if np.any(self.std <= 0):
      raise ValueError(f"std must be > 0, got {self.std}")
    for prefix in ("val", "client_test"):
      x, y, c = (getattr(self, f"{prefix}_x"), getattr(self, f"{prefix}_y"),
                 getattr(self, f"{prefix}_counts"))
      if (x is None) != (y is None) or (x is None) != (c is None):
        raise ValueError(f"{prefix}_x/{prefix}_y/{prefix}_counts must be all "
                         f"set or all None")
      if x is not None:
        _check_stacked(prefix, x, y, c, require_nonempty=False)
        if x.shape[0] != p or x.shape[2:] != self.example_shape:
          raise ValueError(f"{prefix}_x shape {x.shape} does not match "
                           f"{p} clients x {self.example_shape}")
    all_labels = [self.train_y, self.test_y]
    if self.val_y is not None:
      all_labels.append(self.val_y)
    for y in all_labels:
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, got "
                         f"range {y.min()}..{y.max()}")

  @property
  def num_clients(self) -> int:
    return int(self.train_x.shape[0])

  @property
  def max_examples(self) -> int:
    return int(self.train_x.shape[1])

  @property
  def example_shape(self) -> tuple[int, ...]:
    return tuple(self.train_x.shape[2:])

  @property
  def nbytes(self) -> int:
    """Bytes of all arrays (what the engine would put on the device)."""
    arrays = (getattr(self, f.name) for f in dataclasses.fields(self))
    return sum(int(a.nbytes) for a in arrays if isinstance(a, np.ndarray))

  def label_counts(self) -> np.ndarray:
    """(P, num_classes) int64 histogram of each client's real (unpadded) labels."""
    mask = np.arange(self.max_examples)[None, :] < self.counts[:, None]
    out = np.zeros((self.num_clients, self.num_classes), np.int64)
    rows = np.broadcast_to(np.arange(self.num_clients)[:, None], mask.shape)
    np.add.at(out, (rows[mask], self.train_y[mask]), 1)
    return out

  def summary(self) -> str:
    c = self.counts
    lines = [
        f"{self.name}: {self.num_clients} clients, {int(c.sum())} train examples "
        f"(per client min/mean/max {c.min()}/{c.mean():.1f}/{c.max()}, "
        f"padded to {self.max_examples}), {self.test_x.shape[0]} test examples",
        f"  example shape {self.example_shape} {self.train_x.dtype}, "
        f"{self.num_classes} classes, augment={self.augment}, "
        f"{self.nbytes / 2**20:.1f} MiB",
    ]
    if self.val_counts is not None:
      lines.append(f"  validation hold-out: {int(self.val_counts.sum())} examples")
    if self.client_test_counts is not None:
      lines.append(f"  per-client test: {int(self.client_test_counts.sum())} examples")
    return "\n".join(lines)


def _check_stacked(prefix: str, x: np.ndarray, y: np.ndarray, counts: np.ndarray,
                   require_nonempty: bool) -> None:
  if x.ndim < 2:
    raise ValueError(f"{prefix}_x must be (P, M, ...), got shape {x.shape}")
  if y.shape != x.shape[:2] or y.dtype != np.int32:
    raise ValueError(f"{prefix}_y must be int32 of shape {x.shape[:2]}, got "
                     f"{y.dtype} {y.shape}")
  if counts.shape != x.shape[:1] or counts.dtype != np.int32:
    raise ValueError(f"{prefix}_counts must be int32 of shape {x.shape[:1]}, got "
                     f"{counts.dtype} {counts.shape}")
  low = 1 if require_nonempty else 0
  if counts.size and (counts.min() < low or counts.max() > x.shape[1]):
    raise ValueError(f"{prefix} counts must lie in {low}..{x.shape[1]}, got "
                     f"range {counts.min()}..{counts.max()}")


def stack_clients(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray],
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Gather each client's examples into a zero-padded (P, M, ...) array."""
  counts = np.array([len(p) for p in parts], np.int32)
  m = max(int(counts.max()) if counts.size else 0, 1)
  sx = np.zeros((len(parts), m) + x.shape[1:], x.dtype)
  sy = np.zeros((len(parts), m), np.int32)
  for i, idx in enumerate(parts):
    sx[i, :len(idx)] = x[idx]
    sy[i, :len(idx)] = y[idx]
  return sx, sy, counts


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (last axis) mean and std of the [0, 1]-scaled data.

  uint8 data uses an exact 256-bin histogram per channel (no float copy of
  the dataset); float data is reduced in float64.
  """
  c = x.shape[-1] if x.ndim > 1 else 1
  flat = x.reshape(-1, c)
  if x.dtype == np.uint8:
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, var = np.empty(c), np.empty(c)
    for ch in range(c):
      h = np.bincount(flat[:, ch], minlength=256).astype(np.float64)
      h /= h.sum()
      mean[ch] = h @ levels
      var[ch] = h @ (levels - mean[ch]) ** 2
  else:
    mean = flat.mean(axis=0, dtype=np.float64)
    var = flat.var(axis=0, dtype=np.float64)
  std = np.sqrt(var)
  std = np.where(std > 0, std, 1.0)  # A constant channel would divide by 0.
  return mean.astype(np.float32), std.astype(np.float32)


def log_memory(ds: FederatedDataset) -> None:
  """Log the dataset's size, loudly when it is large."""
  gib = ds.nbytes / 2**30
  if ds.nbytes > LARGE_BYTES:
    log.warning("federated dataset %s holds %.2f GiB (train %s %s); the engine "
                "will place it on the device", ds.name, gib, ds.train_x.shape,
                ds.train_x.dtype)
  else:
    log.info("federated dataset %s: %.1f MiB", ds.name, ds.nbytes / 2**20)

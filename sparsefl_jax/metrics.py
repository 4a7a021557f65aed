"""The per-round metrics stream: `metrics.jsonl`, one strict-JSON object per round.

Rows are appended with flush + fsync, so a crash loses at most the row being written (a
partial last line); `truncate_after` drops such a line on resume. Non-finite floats are
written as `null` (strict JSON: no bare NaN/Infinity).
"""
import json
import logging
import math
import os
from typing import Any, Dict, List

import numpy as np


class MetricsFileError(ValueError):
  """metrics.jsonl is damaged where it cannot be repaired (a bad line before the last)."""


def to_python(value: Any) -> Any:
  """Converts jax/numpy scalars and arrays to JSON-ready Python values (non-finite → None)."""
  if isinstance(value, dict):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  arr = np.asarray(value)
  if arr.ndim == 0:
    item = arr.item()
    if isinstance(item, float):
      return item if math.isfinite(item) else None
    return item
  return to_python(arr.tolist())


def dumps_strict(obj: Any, **kwargs) -> str:
  """json.dumps that writes non-finite floats as null and never emits NaN/Infinity."""
  return json.dumps(to_python(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes strict JSON to `path` through a temporary file and an atomic rename."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(dumps_strict(obj, indent=2, sort_keys=True))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsWriter:
  """Appends rows to `<workdir>/metrics.jsonl`; on resume drops rows past the restored round."""

  def __init__(self, path: str):
    self.path = path

  def truncate_after(self, round_index: int) -> List[Dict[str, Any]]:
    """Keeps rows with round <= round_index (a resumed run re-creates the later ones), drops a
    partial last line, recreates a missing file; returns the rows kept."""
    rows = read_metrics(self.path, tolerate_partial_last=True)
    kept = [r for r in rows if r.get("round", 0) <= round_index]
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      for r in kept:
        f.write(dumps_strict(r) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    return kept

  def write(self, row: Dict[str, Any]) -> None:
    line = dumps_strict(row) + "\n"
    with open(self.path, "a") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())


def read_metrics(path: str, tolerate_partial_last: bool = False) -> List[Dict[str, Any]]:
  """All rows of a metrics.jsonl file ([] if it does not exist).

  A line that is not a JSON object raises MetricsFileError naming the file and line; with
  `tolerate_partial_last` a damaged LAST line (a row cut short by a crash) is dropped with a
  warning instead.
  """
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().decode("utf-8", errors="replace").split("\n")
  numbered = [(i + 1, l) for i, l in enumerate(lines) if l.strip()]
  rows = []
  for n, (lineno, line) in enumerate(numbered):
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    except ValueError as e:
      if tolerate_partial_last and n == len(numbered) - 1:
        logging.warning("%s: dropping damaged last line %d (%s)", path, lineno, e)
        break
      raise MetricsFileError(f"{path}: line {lineno} is not a JSON object ({e}); repair or "
                             "remove that line") from None
    rows.append(row)
  return rows


MASK_FILE = "round_{:05d}.npz"


def save_global_mask(directory: str, round_index: int, params) -> str:
  """Writes the non-zero pattern of `params` as packed bits (one array per leaf) to
  `<directory>/round_XXXXX.npz`, for SparsyFed's pairwise-round mask-IoU heat-map."""
  import jax  # local: keep this module importable without touching JAX
  from sparsefl_jax.tree_paths import path_str
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    name = path_str(key_path)
    arrays[f"{name}|{'x'.join(map(str, np.shape(leaf)))}"] = np.packbits(
        np.asarray(leaf) != 0)
  path = os.path.join(directory, MASK_FILE.format(round_index))
  np.savez_compressed(path, **arrays)
  return path


def load_global_masks(directory: str) -> Dict[int, Dict[str, np.ndarray]]:
  """{round: {leaf path: bool mask}} from the files `save_global_mask` wrote."""
  out = {}
  for fname in sorted(os.listdir(directory)):
    if not (fname.startswith("round_") and fname.endswith(".npz")):
      continue
    r = int(fname[len("round_"):-len(".npz")])
    with np.load(os.path.join(directory, fname)) as z:
      masks = {}
      for key in z.files:
        name, _, shape_s = key.rpartition("|")
        shape = tuple(int(s) for s in shape_s.split("x")) if shape_s else ()
        n = int(np.prod(shape)) if shape else 1
        masks[name] = np.unpackbits(z[key], count=n).astype(bool).reshape(shape)
    out[r] = masks
  return out


def pairwise_mask_iou(masks_by_round: Dict[int, Dict[str, np.ndarray]]):
  """(rounds, IoU matrix): Σ_layers|a∧b| / Σ_layers|a∨b| for every pair of saved rounds."""
  rounds = sorted(masks_by_round)
  n = len(rounds)
  iou = np.ones((n, n))
  for i in range(n):
    for j in range(i + 1, n):
      a, b = masks_by_round[rounds[i]], masks_by_round[rounds[j]]
      inter = sum(int(np.sum(a[k] & b[k])) for k in a)
      union = sum(int(np.sum(a[k] | b[k])) for k in a)
      iou[i, j] = iou[j, i] = inter / union if union else 1.0
  return rounds, iou

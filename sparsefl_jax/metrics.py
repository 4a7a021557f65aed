"""The per-round metrics stream: `metrics.jsonl`, one JSON object per round."""
import json
import os
from typing import Any, Dict, List

import numpy as np


def to_python(value: Any) -> Any:
  """Converts jax/numpy scalars and arrays to JSON-ready Python values."""
  if isinstance(value, dict):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  arr = np.asarray(value)
  if arr.ndim == 0:
    item = arr.item()
    return float(item) if isinstance(item, float) else item
  return arr.tolist()


class MetricsWriter:
  """Appends rows to `<workdir>/metrics.jsonl`; on resume drops rows past the restored round."""

  def __init__(self, path: str):
    self.path = path

  def truncate_after(self, round_index: int) -> None:
    """Keeps rows with round <= round_index (a resumed run re-creates the later ones)."""
    rows = [r for r in read_metrics(self.path) if r.get("round", 0) <= round_index]
    with open(self.path, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")

  def write(self, row: Dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(to_python(row)) + "\n")


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """All rows of a metrics.jsonl file ([] if it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


MASK_FILE = "round_{:05d}.npz"


def save_global_mask(directory: str, round_index: int, params) -> str:
  """Writes the non-zero pattern of `params` as packed bits (one array per leaf) to
  `<directory>/round_XXXXX.npz`, for SparsyFed's pairwise-round mask-IoU heat-map."""
  import jax  # local: keep this module importable without touching JAX
  from sparsefl_jax.sparsity.topk import path_str
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

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

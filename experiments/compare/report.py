"""Tables and plots of a comparison from its members' run folders (metrics.jsonl, masks/).

Columns (one row per member):
* fedsparsify: final test accuracy, its mean over the last 5 evaluated rounds, final sparsity
  (1 − global density over all parameters), total transmitted parameters (FedSparsify's C.C.:
  uplink + K·downlink non-zeros, summed over rounds, millions) and the §7.2 cost in Mbit
  (32 bits per transmitted value + 1 bit per entry of every uploaded mask).
* sparsyfed: final test accuracy and its last-5 mean, mean per-round regrowth (parameters a
  client turns from zero to non-zero, mean over clients, then over rounds 2..T: round 1
  also counts the zero-initialised biases every method's training makes non-zero), final global
  density, mean IoU of consecutive global masks (rounds 2..T), cumulative uplink and downlink
  MB under the run's encoding (CSR for SparsyFed's settings).
"""
import json
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from sparsefl_jax import metrics as metrics_lib
from sparsefl_jax import plots


def load_run(workdir: str) -> Optional[Dict[str, Any]]:
  """{'rows', 'config'} of a run folder, or None when it has no metrics yet."""
  rows = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"),
                                  tolerate_partial_last=True)
  if not rows:
    return None
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  return {"rows": rows, "config": config}


def _evaluated(rows: List[dict]) -> List[float]:
  return [r["test_accuracy"] for r in rows if "test_accuracy" in r]


def summary(run: Dict[str, Any]) -> Dict[str, Any]:
  """Every column either table may show, from one run's rows."""
  rows = run["rows"]
  last = rows[-1]
  accs = _evaluated(rows)
  regrowth = [r["regrowth"] for r in rows[1:] if "regrowth" in r]
  iou = [r["mask_iou"] for r in rows[1:] if "mask_iou" in r]
  return {
      "rounds": last["round"], "planned": run["config"]["rounds"],
      "accuracy": accs[-1] if accs else None,
      "last5": statistics.mean(accs[-5:]) if accs else None,
      "density": last["global_density"],
      "cc_mparams": sum(r["transmitted_params"] for r in rows) / 1e6,
      "mbit": sum(r["fedsparsify_cost_mbits"] for r in rows),
      "regrowth": statistics.mean(regrowth) if regrowth else None,
      "iou": statistics.mean(iou) if iou else None,
      "uplink_mb": last["cumulative_uplink_bytes"] / 1e6,
      "downlink_mb": last["cumulative_downlink_bytes"] / 1e6,
      "seconds": sum(r.get("seconds", 0.0) for r in rows),
  }


def over_seeds(summaries: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """One summary of seed replicas: every numeric column's mean, and its sample standard
  deviation under `<column>_std` (a single replica is returned as it is)."""
  if len(summaries) == 1:
    return dict(summaries[0])
  out: Dict[str, Any] = {"replicas": len(summaries)}
  for key in summaries[0]:
    values = [s[key] for s in summaries]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      out[key] = statistics.mean(values)
      out[key + "_std"] = statistics.stdev(values)
    else:
      out[key] = values[0] if all(v == values[0] for v in values) else None
  return out


def _cell(s: Dict[str, Any], key: str, fmt: str, transform=lambda v: v) -> str:
  """`s[key]` formatted, with ± its std over seed replicas when there is one."""
  value = s.get(key)
  if value is None:
    return "–"
  text = format(transform(value), fmt)
  std = s.get(key + "_std")
  return text if std is None else f"{text} ± {format(std, fmt)}"


def table(kind: str, entries: Sequence[Dict[str, Any]]) -> str:
  """Markdown table of `entries` ({'title', 'summary' or 'error'}) with `kind`'s columns."""
  if kind == "fedsparsify":
    head = ("| method | rounds | final acc | mean acc, last 5 | final sparsity "
            "| C.C. (M params) | cost (Mbit) | run time (s) |")
  elif kind == "sparsyfed":
    head = ("| method | rounds | final acc | mean acc, last 5 | mean regrowth / round "
            "| final density | mean IoU (t−1, t) | uplink MB | downlink MB | run time (s) |")
  else:
    raise ValueError(f"table kind={kind!r} is not one of ['fedsparsify', 'sparsyfed']")
  lines = [head, "|" + "---|" * head.count(" |")]
  for e in entries:
    if "error" in e:
      lines.append(f"| {e['title']} | failed: {e['error']} |")
      continue
    s = e["summary"]
    rounds = str(s["rounds"]) + ("" if s["rounds"] == s["planned"] else f" of {s['planned']}")
    common = (f"| {e['title']} | {rounds} | {_cell(s, 'accuracy', '.4f')} "
              f"| {_cell(s, 'last5', '.4f')}")
    if kind == "fedsparsify":
      lines.append(f"{common} | {_cell(s, 'density', '.4f', lambda d: 1 - d)} "
                   f"| {_cell(s, 'cc_mparams', '.1f')} | {_cell(s, 'mbit', ',.0f')} "
                   f"| {s['seconds']:.0f} |")
    else:
      lines.append(f"{common} | {_cell(s, 'regrowth', ',.1f')} | {_cell(s, 'density', '.4f')} "
                   f"| {_cell(s, 'iou', '.4f')} | {_cell(s, 'uplink_mb', ',.1f')} "
                   f"| {_cell(s, 'downlink_mb', ',.1f')} | {s['seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def curves(runs: Dict[str, List[dict]], folder: str, prefix: str, title: str) -> List[str]:
  """Accuracy vs round, accuracy vs cumulative MB, global density vs round; returns paths."""
  out = []
  for name, x, y in (("accuracy_vs_round", "round", "test_accuracy"),
                     ("accuracy_vs_mb", "cumulative_mb", "test_accuracy"),
                     ("density_vs_round", "round", "global_density")):
    path = os.path.join(folder, f"{prefix}{name}.png")
    try:
      out.append(plots.plot_runs(runs, path, x=x, y=y, title=title))
    except ValueError:   # nothing to draw yet (e.g. no evaluated round)
      continue
  return out


def iou_heatmap(workdir: str, path: str, title: str) -> Optional[str]:
  """The pairwise-round IoU heat-map of a run's saved global masks, or None without masks."""
  mask_dir = os.path.join(workdir, "masks")
  if not os.path.isdir(mask_dir) or not os.listdir(mask_dir):
    return None
  rounds, iou = metrics_lib.pairwise_mask_iou(metrics_lib.load_global_masks(mask_dir))
  if len(rounds) < 2:
    return None
  return plots.plot_mask_iou_heatmap(rounds, np.asarray(iou), path, title=title)

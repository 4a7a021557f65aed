"""Plots written to PNG files with matplotlib's Agg backend (no display needed).

A module of plain functions: each takes numpy data and an output path.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MAX_BAR_CLIENTS = 30  # Above this many clients a heat-map reads better.


def plot_label_distribution(label_counts: np.ndarray, path: str,
                            title: str = "Label distribution per client",
                            heatmap: bool | None = None) -> str:
  """Write a PNG of per-client label counts and return its path.

  Args:
    label_counts: (P, C) counts, e.g. `FederatedDataset.label_counts()`.
    path: output .png path (parent folders are created).
    title: figure title.
    heatmap: force a heat-map (True) or stacked bars (False); by default bars
      for up to 30 clients, a heat-map beyond.
  """
  counts = np.asarray(label_counts)
  if counts.ndim != 2 or counts.size == 0:
    raise ValueError(f"label_counts must be a non-empty (clients, classes) "
                     f"array, got shape {counts.shape}")
  if np.any(counts < 0):
    raise ValueError("label_counts must be >= 0")
  num_clients, num_classes = counts.shape
  if heatmap is None:
    heatmap = num_clients > MAX_BAR_CLIENTS
  fig, ax = plt.subplots(figsize=(min(4 + 0.25 * num_clients, 16), 5))
  try:
    if heatmap:
      im = ax.imshow(counts.T, aspect="auto", interpolation="nearest",
                     cmap="viridis", origin="lower")
      fig.colorbar(im, ax=ax, label="examples")
      ax.set_ylabel("class")
    else:
      cmap = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
      bottom = np.zeros(num_clients)
      x = np.arange(num_clients)
      for c in range(num_classes):
        ax.bar(x, counts[:, c], bottom=bottom, width=0.85,
               color=cmap(c % cmap.N), label=str(c))
        bottom += counts[:, c]
      ax.set_ylabel("examples")
      if num_classes <= 20:
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left",
                  fontsize="small")
      ax.set_xticks(x if num_clients <= 30 else x[::max(1, num_clients // 30)])
    ax.set_xlabel("client")
    ax.set_title(title)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
  return path


def plot_mask_iou_heatmap(rounds, iou: np.ndarray, path: str,
                          title: str = "IoU of global masks between rounds") -> str:
  """Pairwise-round IoU of the global masks as a heat-map (SparsyFed Fig. 3); returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 5))
  im = ax.imshow(iou, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
  ticks = np.linspace(0, len(rounds) - 1, min(len(rounds), 8)).round().astype(int)
  ax.set_xticks(ticks, [str(rounds[t]) for t in ticks])
  ax.set_yticks(ticks, [str(rounds[t]) for t in ticks])
  ax.set_xlabel("round")
  ax.set_ylabel("round")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="IoU")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# Plottable values computed from a row's fields: {name: (function of the row, axis label)}.
DERIVED = {
    "cumulative_mb": (lambda r: (r["cumulative_uplink_bytes"] + r["cumulative_downlink_bytes"])
                      / 1e6, "cumulative MB sent (uplink + downlink)"),
}
LABELS = {"round": "round", "test_accuracy": "test accuracy", "global_density":
          "global density (non-zero fraction)", "cumulative_uplink_bytes":
          "cumulative uplink bytes", "train_loss": "train loss"}


def known_metrics(runs: dict) -> list:
  """Names plot_runs accepts: the metrics reference, derived values, and any key in `runs`."""
  from sparsefl_jax import metrics_reference
  names = {n for n in metrics_reference.fields() if "<" not in n} | set(DERIVED)
  for rows in runs.values():
    for row in rows:
      names.update(row)
  return sorted(names)


def _check_metric(name: str, runs: dict) -> None:
  from sparsefl_jax import metrics_reference
  if name in DERIVED or metrics_reference.reference_name(name) is not None:
    return
  if any(name in row for rows in runs.values() for row in rows):
    return
  raise ValueError(f"metric {name!r} is not one of {known_metrics(runs)}")


def _value(row: dict, name: str):
  if name in DERIVED:
    fn = DERIVED[name][0]
    try:
      return fn(row)
    except KeyError:
      return None
  return row.get(name)


def plot_runs(runs: dict, path: str, x: str = "round", y: str = "test_accuracy",
              title: str = "") -> str:
  """Line plot of metric `y` against `x` for several runs ({label: metrics rows}); rows
  without `y` (non-evaluation rounds) are skipped. E.g. x='cumulative_mb' draws accuracy
  against communication (uplink + downlink). Returns path.

  Raises ValueError, listing the known names, for a metric name that is neither in the
  metrics reference, nor derived (`DERIVED`), nor in any row; and when no run has a point.
  """
  _check_metric(x, runs)
  _check_metric(y, runs)
  series = {}
  for label, rows in runs.items():
    pts = [(_value(r, x), _value(r, y)) for r in rows]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    if pts:
      series[label] = pts
  if not series:
    raise ValueError(f"no run has both {x!r} and {y!r} in any row (runs: {list(runs)})")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, pts in series.items():
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker=".", label=label)
  ax.set_xlabel(DERIVED[x][1] if x in DERIVED else LABELS.get(x, x))
  ax.set_ylabel(DERIVED[y][1] if y in DERIVED else LABELS.get(y, y))
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

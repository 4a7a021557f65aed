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


def plot_runs(runs: dict, path: str, x: str = "round", y: str = "test_accuracy",
              title: str = "") -> str:
  """Line plot of metric `y` against `x` for several runs ({label: metrics rows}); rows
  without `y` (non-evaluation rounds) are skipped. E.g. x='cumulative_uplink_bytes' draws
  accuracy against communication. Returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, rows in runs.items():
    pts = [(r[x], r[y]) for r in rows if y in r and x in r]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, marker=".", label=label)
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

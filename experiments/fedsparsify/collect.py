r"""Results table of a FedSparsify sweep, next to the paper's Table numbers (FMNIST, Global).

  python experiments/fedsparsify/collect.py [runs/fedsparsify]

Reads every <dir>/*/metrics.jsonl and prints one markdown row per run: final test accuracy
(and its mean over the last 5 evaluated rounds: non-IID accuracy oscillates round to round),
non-zero parameters of the final global model, cumulative transmitted parameters (uplink +
K·downlink non-zeros, millions: the paper's C.C. unit for FMNIST), the same relative to the
dense run, the §7.2 cost in Mbit (mask bits included) and the median seconds per round.
"""
import json
import os
import statistics
import sys

# FedSparsify-Global, FMNIST 2-FC, non-IID, 10 clients, 200 rounds (the paper's Table for FMNIST).
PAPER = {0.0: (0.7489, 473), 0.8: (0.74, 190), 0.85: (0.735, 173), 0.9: (0.749, 155),
         0.95: (0.735, 137), 0.99: (0.687, 123)}
N_FMNIST = 118_282


def summarize(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  last = rows[-1]
  n_total = round(last["nnz_params"] / last["global_density"]) if "nnz_params" in last \
      else N_FMNIST
  dense = cfg["algorithm"] in ("fedavg", "fedprox", "fedadam")
  return {
      "name": os.path.basename(workdir), "algorithm": cfg["algorithm"],
      "sparsity": 0.0 if dense else cfg["sparsity"], "rounds": last["round"],
      "planned": cfg["rounds"], "accuracy": last.get("test_accuracy"),
      "last5": statistics.mean(r["test_accuracy"] for r in rows[-5:] if "test_accuracy" in r),
      "nnz": last.get("nnz_params", round(last["global_density"] * n_total)),
      "cc": sum(r["transmitted_params"] for r in rows) / 1e6,
      "mbit": sum(r["fedsparsify_cost_mbits"] for r in rows),
      "sec": statistics.median(r["seconds"] for r in rows),
  }


def main(root: str) -> None:
  runs = [summarize(os.path.join(root, d)) for d in sorted(os.listdir(root))
          if os.path.exists(os.path.join(root, d, "metrics.jsonl"))]
  runs.sort(key=lambda r: (r["algorithm"] != "fedavg", r["algorithm"], r["sparsity"]))
  dense_cc = next((r["cc"] for r in runs if r["algorithm"] == "fedavg"
                   and r["rounds"] == r["planned"]), None)
  print("| run | s_T | rounds | final acc | mean acc, last 5 | non-zero params | C.C. (M params) "
        "| vs dense | cost (Mbit) | s/round | paper acc | paper C.C. (vs dense) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in runs:
    acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
    rounds = str(r["rounds"]) + ("" if r["rounds"] == r["planned"] else f" of {r['planned']}")
    rel = f"{r['cc'] / dense_cc:.3f}" if dense_cc else "-"
    p_acc, p_cc = PAPER.get(r["sparsity"], (None, None))
    paper = (f"{p_acc} | {p_cc} ({p_cc / PAPER[0.0][1]:.3f})"
             if p_acc is not None and r["algorithm"] != "fedsparsify_local" else "- | -")
    print(f"| {r['name']} | {r['sparsity']} | {rounds} | {acc} | {r['last5']:.4f} "
          f"| {r['nnz']:,} | {r['cc']:.1f} | {rel} | {r['mbit']:,.0f} | {r['sec']:.2f} "
          f"| {paper} |")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/fedsparsify")

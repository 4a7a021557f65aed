"""experiments/compare: the comparison run sets' commands, their tables, and both sets end to
end on a shortened, synthetic-data version (every method of each set, 2 rounds)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = os.path.join(ROOT, "experiments", "compare")
sys.path[:0] = [COMPARE, os.path.join(ROOT, "experiments")]

import compare  # noqa: E402
import report  # noqa: E402
import sets  # noqa: E402

# Small data, same models: what CI can afford for every method of a set.
SHORT = ["--override=--dataset=synthetic", "--override=--synthetic_shape=28,28,1",
         "--override=--synthetic_examples=40", "--override=--synthetic_test=64",
         "--override=--local_epochs=1", "--override=--batch_size=16"]


def _rows():
  return [
      {"round": 1, "test_accuracy": 0.5, "global_density": 1.0, "transmitted_params": 10,
       "fedsparsify_cost_mbits": 1.0, "regrowth": 4.0, "mask_iou": 0.5,
       "cumulative_uplink_bytes": 1e6, "cumulative_downlink_bytes": 2e6, "seconds": 1.0},
      {"round": 2, "global_density": 0.5, "transmitted_params": 30,
       "fedsparsify_cost_mbits": 2.5, "regrowth": 2.0, "mask_iou": 0.8,
       "cumulative_uplink_bytes": 3e6, "cumulative_downlink_bytes": 5e6, "seconds": 2.0},
      {"round": 3, "test_accuracy": 0.7, "global_density": 0.25, "transmitted_params": 60,
       "fedsparsify_cost_mbits": 3.0, "regrowth": 0.0, "mask_iou": 0.9,
       "cumulative_uplink_bytes": 4e6, "cumulative_downlink_bytes": 6e6, "seconds": 3.0},
  ]


def test_summary_columns_from_rows():
  s = report.summary({"rows": _rows(), "config": {"rounds": 4}})
  assert (s["rounds"], s["planned"]) == (3, 4)
  assert s["accuracy"] == 0.7 and s["last5"] == pytest.approx(0.6)   # evaluated rounds only
  assert s["density"] == 0.25
  assert s["cc_mparams"] == pytest.approx(100e-6) and s["mbit"] == pytest.approx(6.5)
  assert s["regrowth"] == pytest.approx(1.0)   # rounds 2..T: round 1 counts the zero-init biases
  assert s["iou"] == pytest.approx(0.85)              # rounds 2..T: round 1 has no predecessor
  assert (s["uplink_mb"], s["downlink_mb"]) == (4.0, 6.0)
  fs = report.table("fedsparsify", [{"title": "X", "summary": s},
                                    {"title": "Y", "error": "boom"}])
  assert "| X | 3 of 4 | 0.7000 | 0.6000 | 0.7500 |" in fs and "| Y | failed: boom |" in fs
  sf = report.table("sparsyfed", [{"title": "X", "summary": s}])
  assert "| 1.0 | 0.2500 | 0.8500 | 4.0 | 6.0 |" in sf
  with pytest.raises(ValueError, match="table kind='bogus' is not one of"):
    report.table("bogus", [])


def test_seed_replicas_give_mean_and_std():
  a = report.summary({"rows": _rows(), "config": {"rounds": 3}})
  rows = [dict(r, test_accuracy=r["test_accuracy"] - 0.1) if "test_accuracy" in r else r
          for r in _rows()]
  b = report.summary({"rows": rows, "config": {"rounds": 3}})
  s = report.over_seeds([a, b])
  assert s["replicas"] == 2 and s["accuracy"] == pytest.approx(0.65)
  assert s["accuracy_std"] == pytest.approx(0.1 / 2 ** 0.5)   # sample std of 0.7, 0.6
  assert s["density_std"] == 0.0
  fs = report.table("fedsparsify", [{"title": "X", "summary": s}])
  assert "| 0.6500 ± 0.0707 |" in fs and "| 0.7500 ± 0.0000 |" in fs
  assert report.over_seeds([a]) == a
  assert compare.replica_dirs("/r/m", 1) == ["/r/m"]
  assert compare.replica_dirs("/r/m", 2) == ["/r/m/seed_offset=0", "/r/m/seed_offset=1"]


def test_member_commands_build_the_configs_run_py_would():
  cset = sets.SETS["fedsparsify"]
  ft = next(m for m in cset.members if m.label == "oneshot_ft")
  argv = compare.member_argv(cset, ft, (), 200, "/tmp/x", ["--local_epochs=1"])
  assert "--oneshot_finetune_rounds=10" in argv          # the paper's T − 10
  assert "--oneshot_finetune_rounds=2" in compare.member_argv(cset, ft, (), 3, "/tmp/x", ())
  cfg = compare.config_for(compare.member_argv(
      cset, next(m for m in cset.members if m.label == "fedprox"), (), 7, "/tmp/x",
      ["--local_epochs=1"]))
  assert (cfg.algorithm, cfg.rounds, cfg.sparsity, cfg.local_epochs) == ("fedprox", 7, 0.9, 1)
  assert (cfg.prox_mu, cfg.seed, cfg.classes_per_client, cfg.workdir) == (
      0.001, 1990, 2, "/tmp/x")
  sy = sets.SETS["sparsyfed"]
  group, group_flags = sy.groups[0]
  cfg = compare.config_for(compare.member_argv(sy, sy.members[0], group_flags, 30, "/tmp/y",
                                               ()))
  assert (group, cfg.alpha, cfg.sparsity, cfg.mask_metrics, cfg.model) == (
      "alpha0.1", 0.1, 0.95, True, "leaf_cnn")


def _compare(*args, timeout=900):
  return subprocess.run([sys.executable, os.path.join(COMPARE, "compare.py"), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": ROOT})


def test_unknown_method_label_is_one_line():
  r = _compare("--set=fedsparsify", "--methods=fedavg,bogus", "--report_only")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: --methods=bogus is not among [")


@pytest.mark.parametrize("name,extra", [("fedsparsify", []),
                                        ("sparsyfed", ["--groups=alpha0.1",
                                                       "--override=--num_clients=6",
                                                       "--override=--clients_per_round=3"])])
def test_comparison_runs_end_to_end(tmp_path, name, extra):
  out, runs = tmp_path / "out", tmp_path / "runs"
  args = [f"--set={name}", "--rounds=2", f"--out={out}", f"--runs_dir={runs}", *SHORT, *extra]
  r = _compare(*args)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  cset = sets.SETS[name]
  doc = (out / "README.md").read_text()
  assert "failed" not in doc
  for m in cset.members:   # every method has its row, its run.py command and its metrics
    assert f"| {m.title} | 2 |" in doc, m.title
    assert f"--algorithm={m.flags_for(2)[0].split('=')[1]}" in doc
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["runs"]) == len(cset.members)
  for png in ("accuracy_vs_round", "accuracy_vs_mb", "density_vs_round"):
    prefix = "alpha0.1_" if name == "sparsyfed" else ""
    assert (out / f"{prefix}{png}.png").stat().st_size > 0
  if name == "sparsyfed":   # mask metrics for every method, and its heat-map
    for label, s in summary["runs"].items():
      assert s["regrowth"] is not None and s["iou"] is not None, label
      assert (out / s["iou_heatmap"]).exists()
  # Re-running resumes: finished members are reused, the table is the same.
  again = _compare(*args)
  assert again.returncode == 0 and (out / "README.md").read_text().split("## Commands")[1] \
      == doc.split("## Commands")[1]

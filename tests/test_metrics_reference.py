"""The metrics reference matches what the code emits, and BUILD.md shows the current table."""
import os

import pytest

from sparsefl_jax import ExperimentConfig, algorithms, metrics_reference, train
from sparsefl_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
            synthetic_classes=4, synthetic_examples=12, synthetic_test=20, num_clients=3,
            clients_per_round=2, batch_size=6, lr=0.1, sparsity=0.5, rounds=1,
            prune_start_round=0, progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
  """{algorithm: keys of its one-round metrics row} for every registered algorithm."""
  out = {}
  for name in algorithms.ALGORITHMS:
    workdir = tmp_path_factory.mktemp(name)
    train.run(ExperimentConfig(**TINY, algorithm=name, workdir=str(workdir)))
    (row,) = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    out[name] = set(row)
  return out


def test_reference_rows_name_only_registered_algorithms():
  for field, info in metrics_reference.fields().items():
    assert info.methods is None or set(info.methods) <= set(algorithms.ALGORITHMS), field


def test_every_emitted_key_is_in_the_reference(emitted):
  for name, keys in emitted.items():
    missing = metrics_reference.undocumented(keys)
    assert not missing, (f"algorithm {name!r} emits metrics.jsonl fields {missing} that "
                         "sparsefl_jax/metrics_reference.py does not describe; add them to "
                         "FIELDS and regenerate BUILD.md's table")


def test_reference_methods_are_exactly_the_emitters(emitted):
  for field, info in metrics_reference.fields().items():
    emitters = {name for name, keys in emitted.items()
                if any(metrics_reference.reference_name(k) == field for k in keys)}
    assert emitters, f"reference field {field!r} is emitted by no algorithm"
    assert emitters == set(info.methods or algorithms.ALGORITHMS), (
        f"{field!r}: the reference says {sorted(info.methods)}, emitted by {sorted(emitters)}")


def test_layer_patterns_match_per_layer_keys():
  assert metrics_reference.reference_name("density/Conv_0") == "density/<layer>"
  assert metrics_reference.reference_name("density/") is None
  assert metrics_reference.undocumented(["round", "regrowth", "bogus"]) == ["bogus"]


def test_build_md_holds_the_current_table():
  with open(os.path.join(ROOT, "BUILD.md")) as f:
    doc = f.read()
  assert metrics_reference.splice(doc) == doc, (
      "BUILD.md's metrics reference is stale: run "
      "python -m sparsefl_jax.metrics_reference --write BUILD.md")


def test_a_method_documents_its_own_metrics_in_its_file(monkeypatch):
  cls = algorithms.algorithm_class("topk")
  new = metrics_reference.MetricField("A test-only key.", "", methods=())
  monkeypatch.setattr(cls, "metric_fields", {"probe_key": new, "nnz_params": None})
  got = metrics_reference.fields()
  # SparsyFed subclasses Top-K: it inherits the declaration (and emits what Top-K emits).
  assert got["probe_key"].methods == ("sparsyfed", "topk")
  monkeypatch.setattr(cls, "metric_fields", {})
  without = metrics_reference.fields()["nnz_params"].methods
  # (as sets: a method sorting after topk, such as topk_delta, may declare it too)
  assert sorted(got["nnz_params"].methods) == sorted(without + ("sparsyfed", "topk"))
  monkeypatch.setattr(cls, "metric_fields", {"probe_key": new, "nnz_params": None})
  assert "`topk`" in metrics_reference.markdown_table().split("probe_key")[1].split("\n")[0]
  monkeypatch.setattr(cls, "metric_fields", {"round": None})
  with pytest.raises(ValueError, match="universal metric 'round'"):
    metrics_reference.fields()

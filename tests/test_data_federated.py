"""FederatedDataset invariants, build_federated_dataset and its errors."""
import dataclasses
import math

import numpy as np
import pytest

from sparsefl_jax.data import (DATASETS, PARTITIONS, FederatedDataset, SyntheticSpec,
                               build_federated_dataset)
from sparsefl_jax.data.federated import channel_stats, stack_clients
from sparsefl_jax.data.small import load_digits_arrays
from sparsefl_jax.data.synthetic import make_synthetic


def check_invariants(ds: FederatedDataset, pool_x, pool_y):
  """Padding is zero, counts are right, each client row is a real example."""
  p, m = ds.train_y.shape
  assert ds.train_x.shape[:2] == (p, m) and ds.counts.shape == (p,)
  assert ds.counts.dtype == np.int32 and ds.train_y.dtype == np.int32
  assert ds.counts.min() >= 1 and ds.counts.max() == m
  lookup = {x.tobytes(): [] for x in pool_x}
  for x, y in zip(pool_x, pool_y):
    lookup[x.tobytes()].append(int(y))
  for i in range(p):
    n = ds.counts[i]
    assert not ds.train_x[i, n:].any() and not ds.train_y[i, n:].any()
    for x, y in zip(ds.train_x[i, :n], ds.train_y[i, :n]):
      assert int(y) in lookup[x.tobytes()]
  np.testing.assert_array_equal(
      ds.label_counts(),
      np.stack([np.bincount(ds.train_y[i, :ds.counts[i]], minlength=ds.num_classes)
                for i in range(p)]))


@pytest.fixture(scope="module")
def digits():
  return load_digits_arrays()


def test_digits_arrays(digits):
  tx, ty, vx, vy = digits
  assert tx.shape == (1500, 8, 8, 1) and vx.shape == (297, 8, 8, 1)
  assert tx.dtype == np.uint8 and tx.max() == 255
  assert set(np.unique(ty)) == set(range(10))
  # The split is a partition of sklearn's 1797 images.
  from sklearn.datasets import load_digits
  d = load_digits()
  assert ty.size + vy.size == d.target.size
  np.testing.assert_array_equal(np.bincount(np.r_[ty, vy]), np.bincount(d.target))


@pytest.mark.parametrize("partition,kw", [
    ("iid", {}), ("lda", {"alpha": 0.5}), ("dirichlet", {"alpha": 0.5}),
    ("classes", {"classes_per_client": 2}),
])
def test_build_digits_invariants(digits, partition, kw):
  ds = build_federated_dataset("digits", num_clients=5, partition=partition, **kw)
  check_invariants(ds, digits[0], digits[1])
  assert ds.num_clients == 5 and ds.example_shape == (8, 8, 1)
  assert ds.test_x.shape == (297, 8, 8, 1) and ds.test_y.dtype == np.int32
  if partition in ("iid", "lda", "classes"):
    assert ds.counts.sum() == 1500
  if partition == "lda":
    assert (ds.counts == 300).all()
  if partition == "classes":
    # Chunks of 150 may straddle a class boundary on digits (classes hold
    # 138..153 examples): 2 chunks hold at most 4 labels, and the two chunks
    # of a client never share a label.
    lc = ds.label_counts()
    assert ((lc > 0).sum(1) <= 4).all()
    assert (np.sort(lc, axis=1)[:, -2:].sum(1) >= 0.8 * ds.counts).all()
  assert str(ds.num_clients) in ds.summary()


def test_mean_std_are_dataset_statistics(digits):
  ds = build_federated_dataset("digits", num_clients=3)
  scaled = digits[0].astype(np.float64) / 255.0
  np.testing.assert_allclose(ds.mean, [scaled.mean()], rtol=1e-5)
  np.testing.assert_allclose(ds.std, [scaled.std()], rtol=1e-5)
  x = np.random.default_rng(0).normal(size=(50, 4, 4, 2)).astype(np.float32)
  m, s = channel_stats(x)
  np.testing.assert_allclose(m, x.reshape(-1, 2).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s, x.reshape(-1, 2).std(0), rtol=1e-5)


def test_validation_hold_out(digits):
  ds = build_federated_dataset("digits", num_clients=4, val_fraction=0.1)
  assert (ds.val_counts == 37).all() and (ds.counts == 338).all()
  assert ds.val_x.shape == (4, 37, 8, 8, 1) and ds.val_y.dtype == np.int32
  # Train and validation together are the IID partition without hold-out.
  full = build_federated_dataset("digits", num_clients=4)
  for i in range(4):
    a = np.concatenate([ds.train_x[i, :ds.counts[i]], ds.val_x[i, :ds.val_counts[i]]])
    b = full.train_x[i, :full.counts[i]]
    assert sorted(r.tobytes() for r in a) == sorted(r.tobytes() for r in b)


def test_partition_test_lda_uses_train_matrix():
  spec = SyntheticSpec(example_shape=(2, 2, 1), examples_per_client=200, num_test=400)
  ds = build_federated_dataset("synthetic", num_clients=4, partition="lda", alpha=0.1,
                               partition_test=True, synthetic=spec)
  assert (ds.client_test_counts == 100).all()
  train_major = ds.label_counts().argmax(1)
  test_counts = np.stack([np.bincount(ds.client_test_y[i], minlength=10)
                          for i in range(4)])
  assert np.mean(train_major == test_counts.argmax(1)) >= 0.75


def test_synthetic_deterministic_and_natural():
  spec = SyntheticSpec(example_shape=(4, 4, 3), num_classes=5, examples_per_client=6,
                       num_test=7)
  a = build_federated_dataset("synthetic", num_clients=3, synthetic=spec, data_seed=1)
  b = build_federated_dataset("synthetic", num_clients=3, synthetic=spec, data_seed=1)
  c = build_federated_dataset("synthetic", num_clients=3, synthetic=spec, data_seed=2)
  np.testing.assert_array_equal(a.train_x, b.train_x)
  assert not np.array_equal(a.train_x, c.train_x)
  assert a.train_x.dtype == np.uint8 and a.test_x.shape == (7, 4, 4, 3)
  assert a.mean.shape == (3,) and a.num_classes == 5
  nat = build_federated_dataset("synthetic", num_clients=3, partition="natural",
                                synthetic=spec, data_seed=1)
  assert (nat.counts == 6).all()
  raw_x = make_synthetic(spec, 3, seed=1)[0]
  blocks = {raw_x[i * 6:(i + 1) * 6].tobytes() for i in range(3)}
  got = {nat.train_x[i].tobytes() for i in range(3)}  # Order within a block kept.
  assert blocks == got


def test_stack_clients_padding():
  x = np.arange(10, dtype=np.uint8)[:, None] + 1
  y = np.arange(10, dtype=np.int32)
  sx, sy, c = stack_clients(x, y, [np.array([0, 1, 2]), np.array([9])])
  np.testing.assert_array_equal(c, [3, 1])
  np.testing.assert_array_equal(sx[:, :, 0], [[1, 2, 3], [10, 0, 0]])
  np.testing.assert_array_equal(sy, [[0, 1, 2], [9, 0, 0]])


def test_dataset_rejects_inconsistent_arrays():
  ds = build_federated_dataset("digits", num_clients=2)
  fields = dataclasses.asdict(ds)
  with pytest.raises(ValueError, match="counts must lie in 1"):
    FederatedDataset(**{**fields, "counts": np.array([0, 5], np.int32)})
  with pytest.raises(ValueError, match="train_y must be int32"):
    FederatedDataset(**{**fields, "train_y": ds.train_y.astype(np.int64)})
  with pytest.raises(ValueError, match="augment must be one of"):
    FederatedDataset(**{**fields, "augment": "mixup"})
  with pytest.raises(ValueError, match="labels must lie in 0..9"):
    FederatedDataset(**{**fields, "test_y": ds.test_y + 10})
  with pytest.raises(ValueError, match="val_x/val_y/val_counts"):
    FederatedDataset(**{**fields, "val_x": ds.train_x})


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="imagenet"), r"unknown dataset 'imagenet'; choose one of .*digits"),
    (dict(partition="pathological"), r"unknown partition 'pathological'"),
    (dict(num_clients=0), r"num_clients must be an integer >= 1, got 0"),
    (dict(num_clients=2000), r"num_clients=2000 exceeds .* 1\.\.1500"),
    (dict(alpha=0.0), r"alpha must be a number > 0"),
    (dict(alpha=-1.0, partition="lda"), r"alpha must be a number > 0"),
    (dict(alpha=math.inf, partition="dirichlet"), r"alpha=inf"),
    (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\), got 1.0"),
    (dict(val_fraction=-0.1), r"val_fraction"),
    (dict(min_partition_size=0, partition="dirichlet"), r"min_partition_size"),
    (dict(classes_per_client=11, partition="classes"), r"classes_per_client .* 1\.\.10"),
    (dict(num_clients=7, partition="lda"), r"1500\) to be a multiple of num_clients=7"),
    (dict(partition="natural"), r"needs an id feature"),
    (dict(partition="dirichlet", partition_test=True), r"partition_test"),
    (dict(synthetic=SyntheticSpec()), r"only applies to name='synthetic'"),
])
def test_bad_inputs_raise_clear_value_errors(kwargs, match):
  args = dict(name="digits", num_clients=5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    build_federated_dataset(args.pop("name"), **args)


def test_bad_synthetic_spec():
  with pytest.raises(ValueError, match="examples_per_client must be >= 1"):
    SyntheticSpec(examples_per_client=0)
  with pytest.raises(ValueError, match="example_shape"):
    SyntheticSpec(example_shape=(0, 3))


def test_memory_estimate_logged_when_large(caplog, monkeypatch):
  from sparsefl_jax.data import federated
  monkeypatch.setattr(federated, "LARGE_BYTES", 1000)
  with caplog.at_level("WARNING"):
    build_federated_dataset("digits", num_clients=2)
  assert "GiB" in caplog.text and "digits" in caplog.text


def test_public_names():
  assert PARTITIONS == ("iid", "lda", "dirichlet", "classes", "natural")
  for name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "emnist/byclass",
               "emnist/balanced", "speech_commands", "digits", "synthetic"):
    assert name in DATASETS

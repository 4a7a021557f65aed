"""Partitioners: sizes, label histograms, coverage, determinism, errors."""
import math

import numpy as np
import pytest

from sparsefl_jax.data import partition as part


def balanced_labels(num_classes=10, per_class=120, seed=0):
  y = np.repeat(np.arange(num_classes), per_class)
  return np.random.default_rng(seed).permutation(y)


def assert_exact_cover(parts, n, allow_missing=0):
  flat = np.concatenate(parts)
  assert np.unique(flat).size == flat.size, "an index was given to two clients"
  assert flat.min() >= 0 and flat.max() < n
  assert n - flat.size == allow_missing


def hist(labels, parts, c):
  return np.stack([np.bincount(labels[p], minlength=c) for p in parts])


def lda_reference(labels, num_clients, alpha, seed, num_classes):
  """Flower's algorithm one draw at a time (the same RNG stream order)."""
  rng = np.random.default_rng(seed)
  perm = rng.permutation(labels.size)
  order = perm[np.argsort(labels[perm], kind="stable")]
  pools = [list(order[labels[order] == c]) for c in range(num_classes)]
  dist_all = rng.dirichlet([alpha] * num_classes, size=num_clients)
  u = rng.random(labels.size)
  empty = [len(p) == 0 for p in pools]

  def renorm(d):
    d = d.copy()
    for c in range(num_classes):
      d[c] = 0.0 if empty[c] else d[c] + 1e-5
    return d / (d.sum() + np.finfo(float).eps)

  out, k = [], 0
  for p in range(num_clients):
    d = renorm(dist_all[p])
    mine = []
    for _ in range(labels.size // num_clients):
      cdf = np.cumsum(d) / np.sum(d)
      c = int(np.searchsorted(cdf, u[k], side="right"))
      k += 1
      mine.append(pools[c].pop())
      if not pools[c]:
        empty[c] = True
        d = renorm(d)
    out.append(np.sort(mine))
  return out, dist_all


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_lda_matches_one_draw_at_a_time_reference(alpha):
  y = np.random.default_rng(3).integers(0, 7, 700)
  got, dist = part.lda_partition(y, 10, alpha, seed=11, num_classes=7)
  want, want_dist = lda_reference(y, 10, alpha, 11, 7)
  np.testing.assert_array_equal(dist, want_dist)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


def test_lda_equal_sizes_and_exact_cover():
  y = balanced_labels()
  parts, dist = part.lda_partition(y, 12, 0.3, seed=0)
  assert [len(p) for p in parts] == [100] * 12
  assert dist.shape == (12, 10)
  np.testing.assert_allclose(dist.sum(1), 1.0)
  assert_exact_cover(parts, y.size)


def test_lda_small_alpha_skews_and_huge_alpha_is_iid():
  y = balanced_labels(per_class=200)
  skew = hist(y, part.lda_partition(y, 10, 0.05, seed=1)[0], 10)
  near_iid = hist(y, part.lda_partition(y, 10, 1e6, seed=1)[0], 10)
  iid = hist(y, part.iid_partition(y, 10, seed=1), 10)

  def mean_tv(h):  # Mean total-variation distance to the uniform histogram.
    return np.mean(0.5 * np.abs(h / h.sum(1, keepdims=True) - 0.1).sum(1))

  # alpha -> 0: far from uniform; most of a client's data from few classes.
  assert mean_tv(skew) > 0.5
  assert np.mean(skew.max(1) / skew.sum(1)) > 0.5
  # alpha -> inf: as close to uniform as a random IID split (multinomial
  # noise only; the last clients get what is left, as in Flower).
  assert mean_tv(near_iid) < 0.15
  assert mean_tv(near_iid) < 1.5 * mean_tv(iid) + 0.02


def test_lda_alpha_inf_is_stratified_iid():
  y = balanced_labels(per_class=30)
  parts, dist = part.lda_partition(y, 10, math.inf, seed=0)
  h = hist(y, parts, 10)
  np.testing.assert_array_equal(h, np.full((10, 10), 3))
  np.testing.assert_allclose(dist, 0.1)
  assert_exact_cover(parts, y.size)


def test_lda_reuses_given_matrix_for_test_split():
  y_train, y_test = balanced_labels(per_class=100), balanced_labels(per_class=20, seed=1)
  _, dist = part.lda_partition(y_train, 10, 0.2, seed=0)
  t1, d1 = part.lda_partition(y_test, 10, 0.2, seed=5, dirichlet_dist=dist)
  np.testing.assert_array_equal(d1, dist)
  assert [len(p) for p in t1] == [20] * 10
  # Clients' dominant test classes follow the train matrix' dominant classes.
  h = hist(y_test, t1, 10)
  agree = np.mean(h.argmax(1) == dist.argmax(1))
  assert agree >= 0.7


def test_lda_needs_divisible_size():
  with pytest.raises(ValueError, match=r"multiple of num_clients=7"):
    part.lda_partition(balanced_labels(), 7, 1.0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_lda_rejects_bad_alpha(alpha):
  with pytest.raises(ValueError, match="alpha"):
    part.lda_partition(balanced_labels(), 10, alpha)


def test_lda_rejects_wrong_matrix_shape():
  with pytest.raises(ValueError, match=r"\(10, 10\)"):
    part.lda_partition(balanced_labels(), 10, 1.0, dirichlet_dist=np.ones((10, 3)) / 3)


def test_iid_sizes_cover_and_balance():
  y = balanced_labels()
  parts = part.iid_partition(y, 7, seed=0)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  assert_exact_cover(parts, y.size)


@pytest.mark.parametrize("fn", [
    lambda y, s: part.iid_partition(y, 10, s),
    lambda y, s: part.lda_partition(y, 10, 0.5, s)[0],
    lambda y, s: part.dirichlet_partition(y, 10, 0.5, s),
    lambda y, s: part.classes_partition(y, 10, 2, s),
    lambda y, s: part.natural_partition(np.arange(y.size) % 25, 10, s),
])
def test_deterministic_per_seed_and_seed_sensitive(fn):
  y = balanced_labels()
  a, b, c = fn(y, 0), fn(y, 0), fn(y, 1)
  assert all(np.array_equal(p, q) for p, q in zip(a, b))
  assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_classes_exactly_k_labels_each():
  y = balanced_labels(num_classes=10, per_class=100)
  for k in (1, 2, 5):
    parts = part.classes_partition(y, 10, k, seed=0)
    h = hist(y, parts, 10)
    assert ((h > 0).sum(1) == k).all()
    assert [len(p) for p in parts] == [100] * 10
    assert_exact_cover(parts, y.size)
    # Chunks are per class and equal, so each present class has 100 / k.
    assert set(np.unique(h[h > 0])) == {100 // k}


def test_classes_errors():
  y = balanced_labels()
  with pytest.raises(ValueError, match=r"classes_per_client must be .* 1\.\.10"):
    part.classes_partition(y, 10, 11)
  with pytest.raises(ValueError, match=r"classes_per_client must be"):
    part.classes_partition(y, 10, 0)
  # 3 clients x 4 classes: chunks of 100 cannot be dealt without repeats.
  with pytest.raises(ValueError, match="classes partition impossible"):
    part.classes_partition(np.repeat(np.arange(3), 400), 3, 3)


def test_classes_drops_remainder_and_says_so(caplog):
  y = np.repeat(np.arange(4), 26)  # 104 = 4*2*13: all used.
  parts = part.classes_partition(y, 4, 2)
  assert_exact_cover(parts, y.size)
  y = np.repeat(np.arange(4), 25)  # 100 = 3*33 + 1.
  with caplog.at_level("WARNING"):
    parts = part.classes_partition(y, 3, 1)
  assert_exact_cover(parts, y.size, allow_missing=1)
  assert "1 examples" in caplog.text


def test_dirichlet_cover_and_min_size():
  y = balanced_labels()
  parts = part.dirichlet_partition(y, 20, 0.3, seed=0, min_partition_size=20)
  assert min(len(p) for p in parts) >= 20
  assert_exact_cover(parts, y.size)
  assert len({len(p) for p in parts}) > 1  # Sizes vary (label and quantity skew).


def test_dirichlet_resamples_until_min_size_and_errors_if_hopeless():
  y = balanced_labels()
  # Seed 0 first draw has a small client; the function must keep drawing.
  sizes = [len(p) for p in part.dirichlet_partition(y, 30, 0.1, seed=0,
                                                    min_partition_size=1)]
  parts = part.dirichlet_partition(y, 30, 0.1, seed=0, min_partition_size=min(sizes) + 1,
                                   max_tries=50)
  assert min(len(p) for p in parts) >= min(sizes) + 1
  with pytest.raises(ValueError, match="min_partition_size=39"):
    part.dirichlet_partition(y, 30, 0.01, seed=0, min_partition_size=39)
  with pytest.raises(ValueError, match=r"accepted range is 1\.\.40"):
    part.dirichlet_partition(y, 30, 0.5, min_partition_size=41)


def test_natural_groups_whole_ids():
  groups = np.repeat(np.arange(12), 5)
  parts = part.natural_partition(groups, 4, seed=0)
  assert_exact_cover(parts, groups.size)
  owners = [set(groups[p]) for p in parts]
  assert all(len(o) == 3 for o in owners)
  assert set().union(*owners) == set(range(12))
  with pytest.raises(ValueError, match=r"1\.\.12"):
    part.natural_partition(groups, 13)
  with pytest.raises(ValueError, match="id feature"):
    part.natural_partition(None, 4)


def test_split_validation():
  parts = part.iid_partition(balanced_labels(), 10, 0)
  train, val = part.split_validation(parts, 0.1, seed=0)
  for p, t, v in zip(parts, train, val):
    assert len(v) == 12 and len(t) == 108
    np.testing.assert_array_equal(np.sort(np.concatenate([t, v])), np.sort(p))
  with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
    part.split_validation(parts, 1.0)
  with pytest.raises(ValueError, match="at least 2"):
    part.split_validation([np.array([3])], 0.5)


@pytest.mark.parametrize("labels,msg", [
    (np.zeros((3, 3), int), "1-D"),
    (np.array([0.5, 1.0]), "integers"),
    (np.array([-1, 0]), ">= 0"),
])
def test_bad_labels(labels, msg):
  with pytest.raises(ValueError, match=msg):
    part.iid_partition(labels, 1)


def test_too_many_clients():
  with pytest.raises(ValueError, match=r"num_clients=11 exceeds .* 1\.\.10"):
    part.iid_partition(np.arange(10), 11)

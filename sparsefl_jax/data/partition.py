"""Federated partitioners: pure, seeded numpy functions over a label array.

Every partitioner takes the labels (or ids) of a dataset and returns a list of
int64 index arrays, one per client. Together the arrays cover each index at
most once (every partitioner here covers each index exactly once, except
`classes_partition`, which drops — and logs — a remainder smaller than P*k).
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

_LDA_EPS = 1e-5  # Flower's eps for classes whose Dirichlet weight is zero.


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got min {labels.min()}")
  return labels


def _check_clients(num_clients: int, num_examples: int) -> None:
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
  if num_clients > num_examples:
    raise ValueError(
        f"num_clients={num_clients} exceeds the number of examples "
        f"({num_examples}); accepted range is 1..{num_examples}")


def iid_partition(labels: np.ndarray, num_clients: int,
                  seed: int = 0) -> list[np.ndarray]:
  """Random permutation cut into `num_clients` chunks of (nearly) equal size."""
  labels = _check_labels(labels)
  _check_clients(num_clients, labels.size)
  perm = np.random.default_rng(seed).permutation(labels.size)
  return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def _class_pools(labels: np.ndarray, rng: np.random.Generator,
                 num_classes: int) -> list[np.ndarray]:
  """Shuffle, then group indices by label (Flower: shuffle + sort_by_label)."""
  perm = rng.permutation(labels.size)
  order = perm[np.argsort(labels[perm], kind="stable")]
  bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
  return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def _stratified_equal_split(labels: np.ndarray, num_clients: int,
                            rng: np.random.Generator,
                            num_classes: int) -> list[np.ndarray]:
  """α = ∞ branch of Flower's LDA: interleave classes, then equal chunks.

  Flower shuffles, sorts by label "repeating" (0,1,...,C-1,0,1,...) and splits
  into equal chunks; with equal class sizes this gives every client the same
  class histogram. Ranking each example within its class generalises the
  interleave to unequal class sizes.
  """
  pools = _class_pools(labels, rng, num_classes)
  idx = np.concatenate(pools)
  rank = np.concatenate([np.arange(len(p)) for p in pools])
  cls = np.concatenate([np.full(len(p), c) for c, p in enumerate(pools)])
  order = idx[np.lexsort((cls, rank))]
  return [np.sort(p).astype(np.int64) for p in np.split(order, num_clients)]


def _normalize_excluding(dist: np.ndarray, empty: np.ndarray) -> np.ndarray:
  """Flower's exclude_classes_and_normalize: +eps on live classes, 0 on empty."""
  dist = dist.copy()
  dist[~empty] += _LDA_EPS
  dist[empty] = 0.0
  return dist / (dist.sum() + np.finfo(float).eps)


def lda_partition(labels: np.ndarray, num_clients: int, alpha: float,
                  seed: int = 0, num_classes: Optional[int] = None,
                  dirichlet_dist: Optional[np.ndarray] = None,
                  ) -> tuple[list[np.ndarray], np.ndarray]:
  """Equal-size LDA partition, the algorithm of Flower's `create_lda_partitions`.

  Each client p gets exactly N/P examples. Client p draws classes one at a time
  from its Dirichlet row D[p] (+eps on still non-empty classes, renormalised)
  and pops an example from that class' pool; when a pool runs dry the class is
  excluded for all later draws. α = inf gives stratified IID partitions.

  Sampling uses one uniform stream (inverse CDF), consumed in vectorised runs
  between pool exhaustions; this is exactly the one-draw-at-a-time process.

  Args:
    labels: (N,) int labels.
    num_clients: P; N % P must be 0 (Flower's `accept_imbalanced=False`).
    alpha: Dirichlet concentration (> 0; `inf` for IID).
    seed: numpy Generator seed.
    num_classes: C (default: labels.max() + 1).
    dirichlet_dist: a (P, C) matrix to reuse (e.g. the train split's, to split
      the test set the same way); drawn from Dir(α) when None.

  Returns:
    (list of P index arrays, the (P, C) Dirichlet matrix used).
  """
  labels = _check_labels(labels)
  _check_clients(num_clients, labels.size)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if not alpha > 0:  # Also rejects NaN.
    raise ValueError(f"alpha must be > 0 (or inf for IID), got {alpha!r}")
  n = labels.size
  if n % num_clients:
    raise ValueError(
        f"LDA (Flower's equal-size algorithm) needs the number of examples "
        f"({n}) to be a multiple of num_clients={num_clients}; choose "
        f"num_clients dividing {n} or use partition='dirichlet'")
  rng = np.random.default_rng(seed)
  per_client = n // num_clients
  if math.isinf(alpha) and dirichlet_dist is None:
    parts = _stratified_equal_split(labels, num_clients, rng, num_classes)
    hist = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    return parts, hist / per_client
  # RNG order as in Flower: shuffle + sort, then the Dirichlet draw.
  pools = _class_pools(labels, rng, num_classes)
  if dirichlet_dist is None:
    dirichlet_dist = rng.dirichlet(np.full(num_classes, float(alpha)),
                                   size=num_clients)
  dirichlet_dist = np.asarray(dirichlet_dist, np.float64)
  if dirichlet_dist.shape != (num_clients, num_classes):
    raise ValueError(
        f"dirichlet_dist has shape {dirichlet_dist.shape}, expected "
        f"(num_clients, num_classes) = {(num_clients, num_classes)}")
  left = np.array([len(p) for p in pools])  # Pools are popped from the end.
  empty = left == 0
  u = rng.random(n)
  pos = 0
  parts = []
  for p in range(num_clients):
    dist = _normalize_excluding(dirichlet_dist[p], empty)
    taken: list[np.ndarray] = []
    need = per_client
    while need:
      cdf = np.cumsum(dist)
      cls = np.minimum(np.searchsorted(cdf / cdf[-1], u[pos:pos + need],
                                       side="right"), num_classes - 1)
      # Stop the run at the first draw that empties a pool (inclusive).
      stop = need
      for c in np.unique(cls):
        hits = np.flatnonzero(cls == c)
        if hits.size >= left[c]:
          stop = min(stop, hits[left[c] - 1] + 1)
      run = cls[:stop]
      for c, k in zip(*np.unique(run, return_counts=True)):
        # Pop k items from the end of pool c, in pop order.
        taken.append(pools[c][left[c] - k:left[c]][::-1])
        left[c] -= k
      pos += stop
      need -= stop
      newly_empty = (left == 0) & ~empty
      if newly_empty.any():
        empty |= newly_empty
        dist = _normalize_excluding(dist, empty)
    parts.append(np.sort(np.concatenate(taken)).astype(np.int64))
  return parts, dirichlet_dist


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                        seed: int = 0, num_classes: Optional[int] = None,
                        min_partition_size: int = 1,
                        max_tries: int = 10) -> list[np.ndarray]:
  """Label-skew partition with per-class Dirichlet proportions over clients.

  The common non-IID benchmark scheme (Hsu et al. 2019 as used in NIID-Bench
  and Flower Datasets' DirichletPartitioner): for each class c, draw
  q_c ~ Dir(α·1_P) and split class c's shuffled examples among clients by the
  cumulative proportions. Client sizes vary. The whole draw is repeated until
  every client holds at least `min_partition_size` examples; after `max_tries`
  failed draws a ValueError explains how to relax the request.
  """
  labels = _check_labels(labels)
  _check_clients(num_clients, labels.size)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if not alpha > 0 or math.isinf(alpha):
    raise ValueError(f"alpha must be finite and > 0 for partition='dirichlet', "
                     f"got {alpha!r} (use partition='iid' for alpha=inf)")
  if min_partition_size < 1 or min_partition_size * num_clients > labels.size:
    raise ValueError(
        f"min_partition_size={min_partition_size} impossible: accepted range is "
        f"1..{labels.size // num_clients} for {labels.size} examples and "
        f"{num_clients} clients")
  rng = np.random.default_rng(seed)
  for attempt in range(max_tries):
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
      idx = rng.permutation(np.flatnonzero(labels == c))
      q = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(q)[:-1] * idx.size).astype(np.int64)
      for p, chunk in enumerate(np.split(idx, cuts)):
        buckets[p].append(chunk)
    parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
    smallest = min(p.size for p in parts)
    if smallest >= min_partition_size:
      if attempt:
        log.info("dirichlet partition: accepted draw %d (min size %d)",
                 attempt + 1, smallest)
      return parts
  raise ValueError(
      f"dirichlet partition: no draw in {max_tries} tries gave every client >= "
      f"min_partition_size={min_partition_size} examples (alpha={alpha}, "
      f"num_clients={num_clients}, N={labels.size}); raise alpha, lower "
      f"min_partition_size or use fewer clients")


def classes_partition(labels: np.ndarray, num_clients: int,
                      classes_per_client: int, seed: int = 0,
                      num_classes: Optional[int] = None) -> list[np.ndarray]:
  """k classes per client (FedSparsify's non-IID split).

  Sort by label, cut into P*k consecutive chunks of floor(N/(P*k)) examples,
  then greedily give each client, in order, the first remaining chunks whose
  labels do not overlap the labels it already holds, until it has k chunks.
  Raises if k is out of range or any chunk is left unassigned. The remainder
  N mod (P*k) (fewer than P*k examples, at the end of the label order) is
  dropped and logged.
  """
  labels = _check_labels(labels)
  _check_clients(num_clients, labels.size)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  present = np.unique(labels).size
  k = classes_per_client
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= present:
    raise ValueError(f"classes_per_client must be an integer in 1..{present} "
                     f"(classes present), got {k!r}")
  rng = np.random.default_rng(seed)
  pools = _class_pools(labels, rng, num_classes)
  order = np.concatenate(pools)
  n_chunks = num_clients * k
  size = labels.size // n_chunks
  if size == 0:
    raise ValueError(f"classes partition impossible: {labels.size} examples "
                     f"cannot fill num_clients*classes_per_client={n_chunks} chunks")
  dropped = labels.size - n_chunks * size
  if dropped:
    log.warning("classes partition: %d examples (N mod P*k) left out of all "
                "clients", dropped)
  chunks = [order[i * size:(i + 1) * size] for i in range(n_chunks)]
  chunk_labels = [set(np.unique(labels[ch]).tolist()) for ch in chunks]
  remaining = list(range(n_chunks))
  parts = []
  for _ in range(num_clients):
    mine: list[int] = []
    held: set[int] = set()
    for ci in list(remaining):
      if len(mine) == k:
        break
      if not chunk_labels[ci] & held:
        mine.append(ci)
        held |= chunk_labels[ci]
        remaining.remove(ci)
    parts.append(np.sort(np.concatenate([chunks[i] for i in mine]))
                 .astype(np.int64) if mine else np.zeros(0, np.int64))
  if remaining:
    raise ValueError(
        f"classes partition impossible: {len(remaining)} of {n_chunks} chunks "
        f"could not be given to a client without repeating a class "
        f"(num_clients={num_clients}, classes_per_client={k}, "
        f"{present} classes); try fewer classes_per_client or another num_clients")
  return parts


def natural_partition(groups: Optional[np.ndarray], num_clients: int,
                      seed: int = 0) -> list[np.ndarray]:
  """Partition by an id feature (e.g. a writer or speaker id).

  With G distinct ids and P <= G clients, the ids are shuffled and dealt into
  P groups of nearly equal id count; each client gets all examples of its ids.
  """
  if groups is None:
    raise ValueError("partition='natural' needs an id feature (writer/speaker/"
                     "client id) and this dataset has none; use 'iid', 'lda', "
                     "'dirichlet' or 'classes'")
  groups = np.asarray(groups)
  if groups.ndim != 1:
    raise ValueError(f"groups must be 1-D, got shape {groups.shape}")
  ids, inverse = np.unique(groups, return_inverse=True)
  if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= ids.size:
    raise ValueError(f"num_clients must be in 1..{ids.size} (distinct ids) for "
                     f"partition='natural', got {num_clients!r}")
  order = np.random.default_rng(seed).permutation(ids.size)
  client_of_id = np.empty(ids.size, np.int64)
  for p, chunk in enumerate(np.array_split(order, num_clients)):
    client_of_id[chunk] = p
  owner = client_of_id[inverse]
  return [np.flatnonzero(owner == p).astype(np.int64) for p in range(num_clients)]


def split_validation(parts: Sequence[np.ndarray], val_fraction: float,
                     seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Hold out floor(val_fraction * n) (at least 1) random examples per client."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
  rng = np.random.default_rng(seed)
  train, val = [], []
  for p, idx in enumerate(parts):
    if idx.size < 2:
      raise ValueError(f"client {p} has {idx.size} example(s); a validation "
                       f"hold-out needs at least 2 per client")
    n_val = min(max(1, int(math.floor(val_fraction * idx.size))), idx.size - 1)
    perm = rng.permutation(idx)
    val.append(np.sort(perm[:n_val]))
    train.append(np.sort(perm[n_val:]))
  return train, val

"""Random pruning: the pruned set is the prefix of one fixed permutation (numpy), nested, at
FedSparsify's Eq. 1 sparsity; the key follows --init_seed only; bit-identical on resume.
(run.py's generic flag handling is exercised by the other methods' launch tests; this method
declares no flags of its own.)"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import train
from sparsefl_jax.algorithms.random_prune import PERMUTATION_TAG, RandomPrune
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.sparsity.schedules import PolynomialSchedule

RNG = np.random.default_rng(0)
PARAMS = {"conv": {"kernel": jnp.asarray(RNG.normal(size=(3, 3, 2, 4)), jnp.float32),
                   "bias": jnp.zeros((4,))},
          "fc": {"kernel": jnp.asarray(RNG.normal(size=(36, 5)), jnp.float32),
                 "bias": jnp.zeros((5,))}}


def np_permutation(init_seed: int, n: int) -> np.ndarray:
  """π as documented: jax.random.permutation under fold_in(fold_in(PRNGKey(init_seed),
  INIT_STREAM=1), PERMUTATION_TAG)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(init_seed), 1),
                           PERMUTATION_TAG)
  return np.asarray(jax.random.permutation(key, n))


def flat(tree) -> np.ndarray:
  """Entries in the documented order: jax.tree.leaves order, each leaf row-major."""
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def np_count(s: float, n: int) -> int:
  """floor(s·N) for the float32 s the schedule produces."""
  x = float(np.float32(s)) * n
  return math.floor(x + min(x * 2.0**-21, 0.25))


def np_eq1(t: int, s_T: float, T: int, s_0: float = 0.0, t_0: int = 1, F: int = 1,
           n: float = 3) -> float:
  """FedSparsify's Eq. 1 in float64: s_T + (s_0 − s_T)(1 − (t_F − t_0)/(T − t_0))^n."""
  if t >= T:
    return s_T
  t_f = F * (t // F)
  frac = min(max((t_f - t_0) / (T - t_0), 0.0), 1.0)
  return s_T + (s_0 - s_T) * (1 - frac) ** n


def test_train_init_stream_is_the_documented_one():
  assert train.INIT_STREAM == 1 and PERMUTATION_TAG != train.DATA_INIT_TAG


def test_pruned_set_is_the_permutations_prefix_and_nested():
  algo = RandomPrune(schedule=PolynomialSchedule(0.9, 10), init_seed=3)
  state = algo.init_state(PARAMS)
  n = 72 + 4 + 180 + 5
  perm = np_permutation(3, n)
  rank = flat(state.rank)
  np.testing.assert_array_equal(np.sort(rank), np.arange(n))   # a permutation
  np.testing.assert_array_equal(rank[perm], np.arange(n))      # rank[π_i] = i
  previous = np.zeros(n, bool)
  for s in (0.0, 0.1, 0.37, 0.5, 0.9, 0.95):
    pruned = ~flat(algo.prune_masks(PARAMS, jnp.float32(s), state.rank))
    want = np.zeros(n, bool)
    want[perm[:np_count(s, n)]] = True
    np.testing.assert_array_equal(pruned, want)
    assert pruned.sum() == math.floor(s * n + 1e-9)
    assert not (previous & ~pruned).any()                     # nested: previous ⊆ pruned
    previous = pruned
  # Without the ranks the same permutation is recomputed from the key.
  np.testing.assert_array_equal(
      flat(algo.prune_masks(PARAMS, jnp.float32(0.5))),
      flat(algo.prune_masks(PARAMS, jnp.float32(0.5), state.rank)))


def test_the_permutation_follows_the_init_seed_only():
  ranks = [flat(RandomPrune(init_seed=s).init_state(PARAMS).rank) for s in (0, 0, 1)]
  np.testing.assert_array_equal(ranks[0], ranks[1])
  assert not np.array_equal(ranks[0], ranks[2])


SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
             synthetic_classes=4, synthetic_examples=16, synthetic_test=16, num_clients=4,
             clients_per_round=2, batch_size=8, rounds=6, progress=False, tensorboard=False,
             checkpoint_every=0, algorithm="random_prune", sparsity=0.8, init_seed=5, seed=9)


def test_library_run_prunes_the_prefix_at_eq1(tmp_path):
  cfg = ExperimentConfig(**SMALL, prune_frequency=2, workdir=str(tmp_path))
  exp = train.build_experiment(cfg)
  state = exp.init_state
  n = flat(state.params).size
  perm = np_permutation(5, n)          # the run's --init_seed, not its --seed
  np.testing.assert_array_equal(flat(state.algo_state.rank)[perm], np.arange(n))
  pruned_before = np.zeros(n, bool)
  for t in range(1, 7):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    s_t = np_eq1(t, 0.8, 6, F=2) if t > 1 and t % 2 == 0 else None
    got_s = float(m["target_sparsity"])
    if s_t is None:                     # not a pruning round: s holds
      s_t = np_eq1(t - 1, 0.8, 6, F=2) if t > 2 else 0.0
    assert got_s == pytest.approx(s_t, rel=1e-6, abs=1e-7), t
    mask = flat(jax.device_get(state.algo_state.mask))
    want = np.zeros(n, bool)
    want[perm[:np_count(got_s, n)]] = True
    np.testing.assert_array_equal(~mask, want)
    assert not (pruned_before & mask).any()                         # nested, no regrowth
    pruned_before = ~mask
    params = flat(jax.device_get(state.params))
    assert not params[~mask].any()
    assert int(m["nnz_params"]) == int(np.count_nonzero(params))
  assert (~mask).sum() == math.floor(0.8 * n)                        # s_T reached at T


def test_resume_is_bit_identical(tmp_path):
  cfg = ExperimentConfig(**{**SMALL, "rounds": 4, "checkpoint_every": 1},
                         workdir=str(tmp_path / "a"))
  train.run(cfg)
  train.run(cfg.replace(workdir=str(tmp_path / "b")), max_rounds=2)
  train.run(cfg.replace(workdir=str(tmp_path / "b"), resume=True))
  rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"}
           for l in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
  assert len(rows[0]) == 4 and rows[0] == rows[1]
  assert rows[0][-1]["target_sparsity"] == pytest.approx(0.8)


@pytest.mark.parametrize("change,message", [
    (dict(prune_scope="layer"), r"prune_scope='layer': random_prune .* accepted: 'global'"),
    (dict(sparsity_structure="block"), r"sparsity_structure='block' is implemented for"),
    (dict(sparsity=0.0), r"sparsity=0.0 with algorithm='random_prune'"),
])
def test_bad_settings_are_one_line(change, message, tmp_path):
  cfg = ExperimentConfig(**{**SMALL, **change}, workdir=str(tmp_path))
  with pytest.raises(ConfigError, match=message) as e:
    train.build_experiment(cfg)
  assert "\n" not in str(e.value)


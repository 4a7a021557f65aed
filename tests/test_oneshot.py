"""OneShot (± fine-tuning): FedAvg bit for bit before t_p, a numpy global-magnitude prune of
the round-t_p aggregate, no regrowth after; phases, settings, resume."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import algorithms, train
from sparsefl_jax.algorithms.oneshot import OneShot
from sparsefl_jax.config import ConfigError, ExperimentConfig

SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
             synthetic_classes=4, synthetic_examples=12, synthetic_test=20, num_clients=3,
             clients_per_round=3, batch_size=6, lr=0.1, momentum=0.5, rounds=4,
             progress=False, tensorboard=False, checkpoint_every=0, algorithm="oneshot",
             sparsity=0.5, method_args={"oneshot_finetune_rounds": 2})


def np_global_prune(tree, s):
  """numpy reference: threshold sorted(|w|)[floor(s·N)] over every leaf, ties kept."""
  leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
  flat = np.sort(np.abs(np.concatenate([x.ravel() for x in leaves])))
  thr = flat[int(np.floor(s * flat.size))]
  return jax.tree.map(lambda x: np.where(np.abs(np.asarray(x)) >= thr, np.asarray(x), 0),
                      tree)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_dense_rounds_are_fedavg_then_the_aggregate_is_pruned_once_and_never_regrows(
    tmp_path):
  cfg = ExperimentConfig(**SMALL, workdir=str(tmp_path))
  exp = train.build_experiment(cfg)
  assert exp.algorithm.prune_round == 2 and exp.round_step.has_phases
  ref = train.build_experiment(cfg.replace(algorithm="fedavg", method_args={}))
  state, ref_state, history = exp.init_state, ref.init_state, []
  for t in (1, 2, 3, 4):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    history.append(host(state.params))
    if t <= 2:
      ref_state, _ = ref.round_step(ref_state, ref.client_data, ref.train_key)
    if t == 1:   # a dense round is FedAvg's program: bit-identical
      jax.tree.map(np.testing.assert_array_equal, history[0], host(ref_state.params))
      assert int(m["nnz_params"]) == sum(int(np.count_nonzero(x))
                                         for x in jax.tree.leaves(history[0]))
    if t == 2:   # round t_p: FedAvg's aggregate, pruned by global magnitude over all params
      want = np_global_prune(host(ref_state.params), 0.5)
      jax.tree.map(np.testing.assert_array_equal, history[1], want)
      size = sum(x.size for x in jax.tree.leaves(want))
      assert int(m["nnz_params"]) == size // 2
      mask = jax.tree.map(lambda x: x != 0, want)
      jax.tree.map(np.testing.assert_array_equal, host(state.algo_state.mask), mask)
  assert sorted(exp.round_step._steps) == ["dense", "finetune"]
  for params in history[2:]:   # fine-tuning trains inside the mask: no regrowth
    jax.tree.map(lambda p, k: np.testing.assert_array_equal(p[~k], 0), params, mask)
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(history[3]),
                                                   jax.tree.leaves(history[1]))]
  assert max(moved) > 1e-4   # ... and it does train


def test_server_post_prunes_only_at_t_p_and_projects_after_it():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}}
  algo = OneShot(sparsity=0.75, prune_round=7)
  state = algo.init_state(params)
  dense = algo.for_phase("dense")
  same, kept = dense.server_post(params, state, jnp.int32(6))
  jax.tree.map(np.testing.assert_array_equal, host(same), host(params))
  assert all(np.all(m) for m in jax.tree.leaves(host(kept.mask)))
  pruned, new = dense.server_post(params, state, jnp.int32(7))
  want = np_global_prune(host(params), 0.75)
  jax.tree.map(np.testing.assert_array_equal, host(pruned), want)
  assert sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(want)) == 9   # 36 - 27
  # Fine-tuning: a server step that moved pruned entries is projected back onto the mask.
  moved = jax.tree.map(lambda x: x + 1.0, pruned)
  back, _ = algo.for_phase("finetune").server_post(moved, new, jnp.int32(8))
  jax.tree.map(lambda b, w, m: np.testing.assert_array_equal(b, np.where(m, w + 1.0, 0)),
               host(back), want, host(new.mask))
  # --prune_scope=layer: one threshold per tensor.
  per_layer, _ = OneShot(sparsity=0.5, prune_round=1, per_layer=True).for_phase(
      "dense").server_post(params, state, jnp.int32(1))
  for got, x in zip(jax.tree.leaves(host(per_layer)), jax.tree.leaves(host(params))):
    np.testing.assert_array_equal(got, np_global_prune(x, 0.5))


def test_schedule_follows_rounds_and_finetune_rounds():
  cfg = ExperimentConfig(**{**SMALL, "rounds": 200, "method_args": {}}, workdir="/tmp/o")
  plain = algorithms.get_algorithm("oneshot", cfg)
  assert plain.prune_round == 200 and plain.round_phase(200) == "dense"
  tuned = algorithms.get_algorithm("oneshot", cfg.replace(
      method_args={"oneshot_finetune_rounds": 10}))
  assert tuned.prune_round == 190
  assert [tuned.round_phase(t) for t in (1, 190, 191, 200)] == ["dense", "dense", "finetune",
                                                               "finetune"]
  assert "--oneshot_finetune_rounds" in OneShot.rounds_fixed_for(cfg)


@pytest.mark.parametrize("args,message", [
    ({"oneshot_finetune_rounds": -1}, "oneshot_finetune_rounds=-1 must be >= 0"),
    ({"oneshot_finetune_rounds": 4}, "oneshot_finetune_rounds=4 must be < rounds=4"),
])
def test_bad_settings_are_one_line(args, message):
  cfg = ExperimentConfig(**{**SMALL, "method_args": args}, workdir="/tmp/o")
  with pytest.raises(ConfigError) as e:
    algorithms.get_algorithm("oneshot", cfg.validate())
  assert message in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"sparsity=1.0 must lie in \[0, 1\)"):
    OneShot(sparsity=1.0)
  with pytest.raises(ConfigError, match="sparse methods need an explicit --sparsity"):
    ExperimentConfig(**{**SMALL, "sparsity": 0.0}, workdir="/tmp/o").validate()


def test_resume_across_the_pruning_round_is_bit_identical(tmp_path):
  cfg = ExperimentConfig(**{**SMALL, "checkpoint_every": 1, "rounds": 3, "eval_every": 0,
                            "method_args": {"oneshot_finetune_rounds": 1}},
                         workdir=str(tmp_path / "a"))
  train.run(cfg)
  cut = cfg.replace(workdir=str(tmp_path / "b"))
  train.run(cut, max_rounds=2)                   # stops right after pruning at t_p = 2
  train.run(cut.replace(resume=True))
  rows = [[{k: v for k, v in json.loads(l).items() if k != "seconds"}
           for l in open(os.path.join(c.workdir, "metrics.jsonl"))] for c in (cfg, cut)]
  assert rows[0] == rows[1] and len(rows[0]) == 3
  assert rows[0][1]["nnz_params"] < rows[0][0]["nnz_params"]
  with pytest.raises(ConfigError, match=r"oneshot_finetune_rounds"):
    train.run(cut.replace(rounds=5, resume=True))

"""Sweeps (sparsefl_jax/sweep.py): a member of a sweep equals the single run with its flags.

Reference: `train.build_experiment` + its jitted round, run alone for each member's config
(the path `experiments/run.py` takes). Members differ in all four seeds, the partition
(different LDA draws) and a traced hyperparameter, so every mechanism of the sweep is used:
vmapped keys and states, per-member index maps, traced values rebuilt into the algorithm.
Measured on this CPU (jax 0.10.2): training, parameters and every metric bit-identical for
FedAvg (seeds, partition, lr), FedSparsify-Global and Random (sparsity), ZeroFL (sparsity,
mask_ratio) and SparsyFed when only the sparsity is traced; `test_loss` within 2 float32 ulps (the
vmapped evaluation sums the batch losses in another order: compared to 1e-6 relative). A
traced SparsyFed β is not bitwise: the Powerprop power |v|^β with β a run-time operand
instead of a compile-time constant moves the parameters by up to 5.3e-7 relative after 2
rounds; that case is compared to 1e-5.
"""
import dataclasses

import jax
import numpy as np
import pytest

from sparsefl_jax import sweep, train
from sparsefl_jax.config import ConfigError, ExperimentConfig

ROUNDS = 2
BASE = ExperimentConfig(dataset="digits", model="mlp_small", num_clients=6, clients_per_round=3,
                        rounds=ROUNDS, batch_size=16, local_epochs=1, lr=0.1, momentum=0.5,
                        partition="lda", alpha=0.5, progress=False, tensorboard=False,
                        workdir="/tmp/unused")
SEEDS = [dict(seed=1, data_seed=2, init_seed=3, sampling_seed=4),
         dict(seed=5, data_seed=6, init_seed=7, sampling_seed=8)]
CASES = {
    "fedavg": dict(algorithm="fedavg", values=[dict(lr=0.1), dict(lr=0.05)]),
    "fedsparsify_global": dict(algorithm="fedsparsify_global",
                               values=[dict(sparsity=0.5), dict(sparsity=0.8)]),
    "zerofl": dict(algorithm="zerofl", values=[dict(sparsity=0.5, mask_ratio=0.1),
                                               dict(sparsity=0.8, mask_ratio=0.2)]),
    # The permutation comes from each member's own init seed (an init-only field).
    "random_prune": dict(algorithm="random_prune",
                         values=[dict(sparsity=0.5), dict(sparsity=0.8)]),
    "sparsyfed": dict(algorithm="sparsyfed", values=[dict(sparsity=0.5), dict(sparsity=0.8)]),
    "sparsyfed_beta": dict(algorithm="sparsyfed", values=[dict(sparsity=0.8, beta=1.25),
                                                          dict(sparsity=0.8, beta=1.5)],
                           rtol=1e-5),
}


def _single(cfg: ExperimentConfig):
  """ROUNDS rounds of the single run; (state, metrics of each round, final evaluation)."""
  exp = train.build_experiment(cfg)
  state, rows = exp.init_state, []
  for _ in range(ROUNDS):
    state, m = exp.round_step(state, exp.client_data, exp.train_key)
    rows.append(jax.device_get(m))
  ev = exp.evaluate(state.params, state.model_state, state.algo_state, *exp.test_batches)
  return jax.device_get(state), rows, jax.device_get(ev)


@pytest.mark.parametrize("name", list(CASES))
def test_members_equal_their_single_runs(name):
  case = CASES[name]
  configs = [BASE.replace(algorithm=case["algorithm"], **s, **v)
             for s, v in zip(SEEDS, case["values"])]
  sw = sweep.build_sweep(configs)
  assert sw.program.paths, "the hyperparameter must be traced (it differs)"
  state, rows = sw.init_state, []
  for _ in range(ROUNDS):
    state, m = sw.round_step(state)
    rows.append(jax.device_get(m))
  ev = jax.device_get(sw.evaluate(state))
  state = jax.device_get(state)
  rtol = case.get("rtol")
  same = (np.testing.assert_array_equal if rtol is None else
          lambda a, b, err_msg="": np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol,
                                                              err_msg=err_msg))
  # Member 1 (seeds, partition and hyperparameter all differ from the template's member 0)
  # against its single run; member 0 too for FedAvg. (Single runs compile a program each:
  # the CPU time of this file is mostly compilation.)
  for e in ([0, 1] if name == "fedavg" else [1]):
    ref_state, ref_rows, ref_ev = _single(configs[e])
    mine = sweep.Sweep.member_state(state, e)
    for field in ("params", "model_state", "opt_state", "algo_state", "sampling_key"):
      jax.tree.map(lambda a, b: same(a, b, err_msg=field), getattr(mine, field),
                   getattr(ref_state, field))
    assert int(mine.round) == int(ref_state.round) == ROUNDS
    for t in range(ROUNDS):
      got = jax.tree.map(lambda a: np.asarray(a)[e], rows[t])
      assert set(got) == set(ref_rows[t])
      for k in ref_rows[t]:
        same(got[k], ref_rows[t][k], err_msg=f"round {t + 1} {k}")
    assert float(ev["accuracy"][e]) == float(ref_ev["accuracy"])
    np.testing.assert_allclose(ev["loss"][e], ref_ev["loss"], rtol=rtol or 1e-6, atol=0)
  finals = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      sweep.Sweep.member_state(state, e).params)]) for e in range(2)]
  assert np.max(np.abs(finals[0] - finals[1])) > 1e-3   # the members really differ


def test_index_maps_reproduce_the_stacked_partition():
  """Per-member index maps gather exactly data.federate's padded client arrays."""
  from sparsefl_jax import data
  cfg = BASE.replace(val_fraction=0.2, data_seed=3)
  examples = sweep.load_examples(cfg)
  ds = train.build_dataset(cfg)
  parts = sweep.member_parts(examples, cfg)
  index, counts = sweep.index_map(parts, ds.max_examples + 3, examples.pad_index)
  np.testing.assert_array_equal(counts, ds.counts)
  x = examples.pool_x[index]
  np.testing.assert_array_equal(x[:, :ds.max_examples], ds.train_x)
  np.testing.assert_array_equal(examples.pool_y[index][:, :ds.max_examples], ds.train_y)
  assert not x[:, ds.max_examples:].any()   # the extra width is zero padding
  assert isinstance(ds, data.FederatedDataset)


def test_grouping_and_one_line_refusals():
  a = BASE.replace(sparsity=0.5, algorithm="topk", seed=1, workdir="/tmp/a")
  b = a.replace(sparsity=0.9, lr=0.3, alpha=2.0, workdir="/tmp/b")
  c = a.replace(clients_per_round=2)
  d = a.replace(algorithm="fedsparsify_global")
  assert sweep.group_members([a, b, c, d]) == [[0, 1], [2], [3]]
  # synthetic data: the data seed generates the examples, so it separates groups
  s = BASE.replace(dataset="synthetic", synthetic_shape="8,8,1")
  assert sweep.group_members([s, s.replace(data_seed=1), s.replace(seed=1)]) == [[0, 2], [1]]
  with pytest.raises(ConfigError, match=r"^sweep members differ in \['clients_per_round'\]"):
    sweep.build_sweep([a, c])
  # A differing value that fixes control flow: topk_method='top_k' needs a static k.
  with pytest.raises(ConfigError) as excinfo:
    sweep.build_sweep([a.replace(topk_method="top_k", algorithm="topk"),
                       b.replace(topk_method="top_k", algorithm="topk")])
  assert "\n" not in str(excinfo.value)
  with pytest.raises(ConfigError, match=r"^num_devices=2: a sweep runs on one device"):
    sweep.build_sweep([a.replace(num_devices=2)])


def test_traced_paths_and_rebuild():
  @dataclasses.dataclass(frozen=True)
  class Inner:
    x: float
    n: int

  @dataclasses.dataclass(frozen=True)
  class Outer:
    inner: Inner
    pairs: tuple
    name: str

  o1 = Outer(Inner(0.5, 3), (("a", 0.1), ("b", 0.2)), "s")
  o2 = Outer(Inner(0.7, 3), (("a", 0.1), ("b", 0.3)), "s")
  paths = sweep.traced_paths([o1, o2])
  assert paths == (("inner", "x"), ("pairs", 1, 1))
  assert sweep.rebuild(o1, paths, [0.7, 0.3]) == o2
  with pytest.raises(ConfigError, match=r"^sweep members differ in inner\.n=\[3, 4\]"):
    sweep.traced_paths([o1, Outer(Inner(0.5, 4), o1.pairs, "s")])


def test_round_and_optimizer_checks_keep_their_messages_and_accept_tracers():
  from sparsefl_jax.federated import client as client_lib
  from sparsefl_jax.federated import fedopt, optimizers
  from sparsefl_jax.federated.round import RoundConfig
  kw = dict(num_clients=2, clients_per_round=1, local=client_lib.LocalConfig(1, 2, 2),
            lr_schedule=optimizers.ClientLRSchedule(0.1))
  with pytest.raises(ValueError, match=r"^momentum=1\.0 must lie in \[0, 1\)$"):
    RoundConfig(**kw, momentum=1.0)
  with pytest.raises(ValueError, match=r"^weight_decay=-1\.0 must be >= 0$"):
    RoundConfig(**kw, weight_decay=-1.0)
  with pytest.raises(ValueError, match=r"^server_lr=-1\.0 must be > 0$"):
    optimizers.server_optimizer("sgd", -1.0)
  with pytest.raises(ValueError, match=r"^server_eps=0\.0 must be > 0 \(it is τ\)$"):
    fedopt.fedopt("adam", 0.1, tau=0.0)

  def traced(m):   # a traced momentum / weight decay / server lr builds and steps
    RoundConfig(**kw, momentum=m, weight_decay=m)
    p = {"w": jax.numpy.ones(3)}
    opt = optimizers.client_optimizer(0.1, m, m)
    upd, _ = opt.update(p, opt.init(p), p)
    sopt = optimizers.server_optimizer("adam", m + 0.1, m)
    supd, _ = sopt.update(p, sopt.init(p), p)
    return upd["w"][0] + supd["w"][0]
  out = jax.vmap(traced)(jax.numpy.asarray([0.0, 0.5]))
  # momentum 0 adds 0·trace: the same step as the concrete optimizer without a trace
  p = {"w": jax.numpy.ones(3)}
  ref = optimizers.client_optimizer(0.1, 0.0, 0.0)
  ref_upd = ref.update(p, ref.init(p), p)[0]["w"][0]
  sref = optimizers.server_optimizer("adam", 0.1, 0.0)
  assert float(out[0]) == float(ref_upd + sref.update(p, sref.init(p), p)[0]["w"][0])

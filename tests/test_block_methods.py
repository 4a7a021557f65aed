"""--sparsity_structure=block in the upload top-K (Top-K/SparsyFed) and FedSparsify pruning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.algorithms.topk import TopK
from sparsefl_jax.config import ConfigError


def _blocks(kernel2d, bs):
  k, n = kernel2d.shape
  return [kernel2d[i:i + bs, j:j + bs] for i in range(0, k, bs) for j in range(0, n, bs)]


def test_topk_block_upload_keeps_whole_blocks():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                  "bias": jnp.ones((8,))},
            "b": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}}
  up = TopK(sparsity=0.75, structure="block", block_size=4).client_upload(
      params, params, (), jnp.int32(1)).values
  kept = 0
  for name in ("a", "b"):
    for blk in _blocks(np.asarray(up[name]["kernel"]), 4):
      assert np.all(blk == 0) or np.all(blk != 0)
      kept += int(np.all(blk != 0))
  assert kept == int(np.ceil(0.25 * (8 + 4)))
  # The kept blocks are those with the largest L2 norms over all kernels.
  norms = sorted((np.linalg.norm(b) for n in ("a", "b")
                  for b in _blocks(np.asarray(params[n]["kernel"]), 4)), reverse=True)
  kept_norms = sorted((np.linalg.norm(b) for n in ("a", "b")
                       for b in _blocks(np.asarray(up[n]["kernel"]), 4) if np.any(b)),
                      reverse=True)
  np.testing.assert_allclose(kept_norms, norms[:kept], rtol=1e-6)
  np.testing.assert_array_equal(up["a"]["bias"], 1.0)


def test_fedsparsify_block_pruning_is_block_structured(tmp_path):
  cfg = ExperimentConfig(dataset="synthetic", model="mlp_small", synthetic_shape="8,8,1",
                         synthetic_classes=4, synthetic_examples=16, synthetic_test=16,
                         num_clients=2, clients_per_round=2, batch_size=8, rounds=3,
                         algorithm="fedsparsify_global", sparsity=0.8,
                         sparsity_structure="block", block_size=8, progress=False,
                         workdir=str(tmp_path / "w"))
  exp = train.build_experiment(cfg)
  state = exp.init_state
  for _ in range(3):
    state, _ = exp.round_step(state, exp.client_data, exp.train_key)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    leaf = np.asarray(leaf)
    if leaf.ndim == 2:
      for blk in _blocks(leaf, 8):
        assert np.all(blk == 0) or np.count_nonzero(blk) > blk.size // 2, key_path
  kernels = [np.asarray(l) for l in jax.tree.leaves(state.params) if np.ndim(l) == 2]
  density = sum(np.count_nonzero(k) for k in kernels) / sum(k.size for k in kernels)
  assert 0.15 <= density <= 0.25


def test_block_structure_is_refused_where_not_implemented():
  with pytest.raises(ConfigError, match="sparsity_structure='block' is implemented"):
    ExperimentConfig(algorithm="fedavg", sparsity_structure="block").validate()
  with pytest.raises(ConfigError, match="matmul_impl='pallas'"):
    ExperimentConfig(algorithm="topk", sparsity_structure="block",
                     matmul_impl="pallas").validate()

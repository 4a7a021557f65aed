"""Top-K baseline as SparsyFed configures it (Guastella et al. 2025, §5 baselines).

Dense local training (β = 1); before upload each client keeps the top (1 − ŝ) of |w| over all
conv and dense kernels jointly (biases and BatchNorm stay dense) and zeroes the rest; the
server averages the sparse models (FedAvg, or any optax server optimizer) without re-pruning,
so the global model can be denser than 1 − ŝ and pruned weights can regrow.
"""
import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable
from sparsefl_jax.algorithms.base import Algorithm, Upload
from sparsefl_jax.sparsity import block, topk
from sparsefl_jax.sparsity.metrics import global_mask_metrics, regrowth_metrics
from sparsefl_jax.tree_paths import is_kernel


@dataclasses.dataclass(frozen=True)
class TopK(Algorithm):
  """Global magnitude top-K of the kernels before upload; regrowth metrics per client.

  `sparsity` may be a traced scalar (a vmapped sweep) with method 'bisection' or 'sort';
  'top_k' takes a static k and needs a concrete sparsity.
  """
  sparsity: float = 0.95
  method: str = "bisection"
  structure: str = "unstructured"   # 'block': keep whole block_size² blocks of each kernel
  block_size: int = 32

  name = "topk"
  description = "Top-K: dense local training, global top-K of the weights before upload"
  sparse = supports_block = True

  def __post_init__(self):
    super().__post_init__()
    traceable.check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    if self.method == "top_k":
      traceable.require_concrete("sparsity", self.sparsity, "topk_method='top_k' (lax.top_k "
                                 "takes a static k)", "use topk_method='bisection' or 'sort'")

  @classmethod
  def from_config(cls, config) -> "TopK":
    return cls(sparsity=config.sparsity, method=config.topk_method,
               structure=config.sparsity_structure, block_size=config.block_size)

  def upload_masks(self, local_params):
    """Keep-masks of the global top (1 − ŝ) of all kernels (elements or whole blocks)."""
    density = 1.0 - self.sparsity
    return block.keep_masks(
        local_params, density, structure=self.structure, block_size=self.block_size,
        per_layer=False, method=self.method,
        elementwise=lambda: topk.global_topk_masks(local_params, density, filter_fn=is_kernel,
                                                   method=self.method))

  def client_upload(self, global_params, local_params, client_state, t):
    del global_params, client_state, t
    keep = self.upload_masks(local_params)
    return Upload(jax.tree.map(lambda v, m: jnp.where(m, v, 0.0), local_params, keep))

  def client_metrics(self, global_params, upload, client_state) -> Dict[str, jax.Array]:
    """Regrowth (zero in the received model, non-zero in the upload) and its reverse,
    over all parameters as SparsyFed counts it; the engine averages them by example count."""
    del client_state
    return regrowth_metrics(global_params, upload.values)

  def server_metrics(self, old_params, new_params, algo_state):
    del algo_state
    return global_mask_metrics(old_params, new_params)

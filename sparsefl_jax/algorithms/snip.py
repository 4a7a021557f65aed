"""SNIP (Lee, Ajanthan and Torr, "SNIP: Single-shot Network Pruning based on Connection
Sensitivity", ICLR 2019) as a federated baseline, as FedSparsify's comparison runs it.

Once, before round 1, one client drawn from the init seed scores every weight on one batch
of its data by its connection sensitivity |∂L/∂w ⊙ w| (`init_from_data`; the loss is the
mean cross-entropy in training mode). The global top (1 − s) of the scores over all
conv/dense kernels is kept, ties with the threshold included; the rest is zeroed, and the
mask stays fixed for the whole run: clients train inside it (`MaskedTraining`) and the server
re-applies it after its update, so no pruned weight ever regrows. FedAvg aggregation.

Scored: the kernels of conv and dense layers (`tree_paths.is_kernel`). Biases, BatchNorm
scale/offset and BatchNorm statistics are never pruned; `--sparsity` is the fraction of the
kernel entries removed.
"""
import dataclasses
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax.algorithms.base import nnz_server_metrics
from sparsefl_jax.algorithms.masked import MaskedTraining
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk
from sparsefl_jax.traceable import check_range
from sparsefl_jax.tree_paths import is_kernel, path_str
from sparsefl_jax.types import AlgoState, Params, PRNGKey, PyTree, Scalar


class SnipState(NamedTuple):
  """Server state: the fixed mask (bool, params-shaped; all True before the scoring)."""
  mask: PyTree


def connection_sensitivity(params: Params, grads: Params) -> Params:
  """|g ⊙ w| of every kernel (float32); other leaves score 0 (they are never pruned)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, w, g: (topk.abs32(w * g) if is_kernel(path_str(p), w)
                       else jnp.zeros(jnp.shape(w), jnp.float32)), params, grads)


@dataclasses.dataclass(frozen=True)
class SNIP(MaskedTraining):
  """Prune once at initialisation by connection sensitivity; train inside the fixed mask.

  Attributes:
    sparsity: fraction s of the kernel entries removed (the global top 1 − s is kept).
    method: exact threshold algorithm of `sparsity.topk` ('bisection', 'sort', 'top_k').
  """
  sparsity: float = 0.9
  method: str = "bisection"

  name = "snip"
  description = ("SNIP: one client's batch scores |dL/dw * w| at initialisation; the global "
                 "top (1-sparsity) of the kernels is kept, the mask stays fixed")
  sparse = True

  def __post_init__(self):
    super().__post_init__()
    check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    topk.check_method(self.method)

  @classmethod
  def from_config(cls, config) -> "SNIP":
    return cls(sparsity=config.sparsity, method=config.topk_method)

  def init_state(self, params: Params) -> SnipState:
    return SnipState(masks_lib.keep_all(params))

  def scores(self, params: Params, loss_fn) -> Params:
    """Connection sensitivity |∂L/∂w ⊙ w| of every kernel on the probe batch."""
    return connection_sensitivity(params, jax.grad(loss_fn)(params))

  def keep_mask(self, scores: Params) -> PyTree:
    """The global top (1 − s) of the kernels' scores; every other leaf all True."""
    return topk.global_topk_masks(scores, 1.0 - self.sparsity,
                                  filter_fn=is_kernel, method=self.method)

  def init_from_data(self, params: Params, algo_state: AlgoState, loss_fn, key: PRNGKey
                     ) -> Tuple[Params, SnipState]:
    del algo_state, key
    mask = self.keep_mask(self.scores(params, loss_fn))
    return masks_lib.apply_masks(params, mask), SnipState(mask)

  def server_post(self, params: Params, algo_state: SnipState, t: Scalar
                  ) -> tuple[Params, SnipState]:
    # A server optimizer's step would move pruned entries off 0: project back (no regrowth).
    del t
    return masks_lib.apply_masks(params, algo_state.mask), algo_state

  server_metrics = nnz_server_metrics

  metric_fields = {"nnz_params": None}

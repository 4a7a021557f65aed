"""Local training inside a server-held mask: the shared part of the pruning methods.

The server keeps a params-shaped bool mask in its state; every client trains inside it:
`client_init` hands the mask over, `transform_grads` masks the gradients and `post_step`
re-applies the mask after each optimizer step, so pruned weights stay exactly 0 and (the
client optimizer starting fresh every round) so does their momentum. FedSparsify, SNIP and
FedDST build on it; a method says where its mask lives by overriding `global_mask`.
"""
import dataclasses

from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.types import AlgoState, Params, PyTree, Scalar


@dataclasses.dataclass(frozen=True)
class MaskedTraining(Algorithm):
  """Masked local training; no `name`, so not a method of its own."""

  def global_mask(self, algo_state: AlgoState) -> PyTree:
    """The mask the clients train inside (default: `algo_state.mask`)."""
    return algo_state.mask

  def client_init(self, global_params: Params, algo_state: AlgoState, t: Scalar,
                  key) -> PyTree:
    del global_params, t, key
    return self.global_mask(algo_state)

  def transform_grads(self, grads: Params, params: Params, client_state: PyTree) -> Params:
    del params
    return masks_lib.apply_masks(grads, client_state)

  def post_step(self, params: Params, opt_state: PyTree, client_state: PyTree
                ) -> tuple[Params, PyTree, PyTree]:
    # Masked gradients keep the fresh optimizer's momentum at 0 on pruned entries.
    return masks_lib.apply_masks(params, client_state), opt_state, client_state

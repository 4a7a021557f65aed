"""OneShot and OneShot + fine-tuning: FedSparsify's one-shot magnitude-pruning baselines
(Stripelis, Gupta, Ver Steeg and Ambite, "Federated Progressive Sparsification
(Purge-Merge-Tune)+", the OneShot rows of its comparison).

Train dense with FedAvg; at round t_p prune the global model ONCE by global magnitude to the
sparsity s (= --sparsity) and keep the mask from then on:

* t_p = T − F, with T = --rounds and F = --oneshot_finetune_rounds (default 0).
  F = 0 is plain OneShot: the pruning happens after the last aggregation (t_p = T), so the
  final model is sparse and is never trained sparse. F > 0 is OneShot with fine-tuning: F
  masked rounds follow (the paper: T = 200, F = 10, i.e. t_p = 190).
* The pruning operator is FedSparsify's (`sparsity.magnitude_masks`, its Eq. 1 schedule with
  s_i = s_f = s): the threshold is sorted(|w|)[floor(s·N)] over all N trainable parameters
  jointly (conv/dense kernels, biases, BatchNorm scale and offset; zeros included), entries
  with |w| ≥ threshold are kept (ties kept). `--prune_scope=layer` takes one threshold per
  tensor instead, as for FedSparsify; `--topk_method` picks the exact threshold search.
  BatchNorm running statistics live in the model state and are never pruned.
* Rounds t ≤ t_p ("dense" phase) are FedAvg exactly: no mask exists on the clients, the
  server prunes in round t_p after aggregating (a `lax.cond` on the unbatched round, so the
  other dense rounds skip it). Rounds t > t_p ("finetune" phase) train inside the mask
  (`MaskedTraining`: masked gradients, the mask re-applied after every step) and the server
  projects its update back onto the mask, so no pruned weight ever regrows.

Why round phases rather than a `lax.cond` on t inside the client hooks: each phase is its own
compiled round, so the dense rounds are FedAvg's program (no mask carried per client, no
masking per step: bit-identical to FedAvg, tested) and only the fine-tuning rounds pay for
the mask; the price is one more compilation when F > 0. The server state keeps the mask in
both phases (all True before t_p), so a checkpoint is the same tree in either.

The schedule depends on --rounds (t_p = T − F), so --rounds cannot change on resume.
"""
import dataclasses
from typing import NamedTuple

import jax

from sparsefl_jax.algorithms.base import Algorithm, nnz_server_metrics
from sparsefl_jax.algorithms.hyper import Hyper
from sparsefl_jax.algorithms.masked import MaskedTraining
from sparsefl_jax.config import ConfigError
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk
from sparsefl_jax.traceable import check_range
from sparsefl_jax.types import AlgoState, Params, PRNGKey, PyTree, Scalar

DENSE, FINETUNE = "dense", "finetune"


class OneShotState(NamedTuple):
  """Server state: the mask (bool, params-shaped), all True until round t_p prunes."""
  mask: PyTree


@dataclasses.dataclass(frozen=True)
class OneShot(MaskedTraining):
  """Dense FedAvg, one global magnitude pruning to `sparsity` at round `prune_round`, then
  masked fine-tuning.

  Attributes:
    sparsity: s, the fraction of the trainable parameters removed at round t_p.
    prune_round: t_p = rounds − finetune rounds (≥ 1).
    per_layer: one magnitude threshold per tensor instead of one over all parameters.
    method: exact threshold search of `magnitude_masks` ('bisection', 'sort', 'top_k').
  """
  sparsity: float = 0.9
  prune_round: int = 200
  per_layer: bool = False
  method: str = "bisection"

  name = "oneshot"
  description = ("OneShot: dense FedAvg, one global magnitude pruning to --sparsity at round "
                 "rounds - oneshot_finetune_rounds, then masked fine-tuning (no regrowth)")
  sparse = True
  rounds_fixed_reason = ("OneShot prunes at round t_p = --rounds - --oneshot_finetune_rounds")
  hyperparams = (
      Hyper("oneshot_finetune_rounds", 0, "OneShot: F, masked fine-tuning rounds after the "
            "pruning round t_p = rounds - F (0 = plain OneShot: prune after the last "
            "aggregation; the paper's fine-tuned variant uses 10 of 200).", low=0),
  )
  metric_fields = {"nnz_params": None}

  def __post_init__(self):
    super().__post_init__()
    check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    check_range("prune_round", self.prune_round, 1)
    topk.check_method(self.method)

  @classmethod
  def from_config(cls, config) -> "OneShot":
    finetune = cls.hyper(config, "oneshot_finetune_rounds")
    if finetune >= config.rounds:
      raise ConfigError(f"oneshot_finetune_rounds={finetune} must be < rounds={config.rounds} "
                        "(OneShot prunes at round rounds - oneshot_finetune_rounds >= 1)")
    return cls(sparsity=config.sparsity, prune_round=config.rounds - finetune,
               per_layer=config.prune_scope == "layer", method=config.topk_method)

  # ---- phases ------------------------------------------------------------------------------
  def round_phase(self, t: int) -> str:
    return DENSE if t <= self.prune_round else FINETUNE

  def prune_mask(self, params: Params) -> PyTree:
    """FedSparsify's global magnitude mask at s over every trainable parameter."""
    return masks_lib.magnitude_masks(params, self.sparsity, per_layer=self.per_layer,
                                     method=self.method)

  # ---- server ------------------------------------------------------------------------------
  def init_state(self, params: Params) -> OneShotState:
    return OneShotState(masks_lib.keep_all(params))

  def server_post(self, params: Params, algo_state: OneShotState, t: Scalar
                  ) -> tuple[Params, OneShotState]:
    if self.phase == FINETUNE:   # a server optimizer's step must not regrow pruned weights
      return masks_lib.apply_masks(params, algo_state.mask), algo_state

    def prune(_):
      mask = self.prune_mask(params)
      return masks_lib.apply_masks(params, mask), OneShotState(mask)

    # The round counter is unbatched: a real cond, so dense rounds before t_p skip the sort.
    return jax.lax.cond(t == self.prune_round, prune, lambda _: (params, algo_state), None)

  server_metrics = nnz_server_metrics

  # ---- client: FedAvg before t_p, masked training after ------------------------------------
  def client_init(self, global_params: Params, algo_state: AlgoState, t: Scalar,
                  key: PRNGKey) -> PyTree:
    if self.phase == FINETUNE:
      return super().client_init(global_params, algo_state, t, key)
    return Algorithm.client_init(self, global_params, algo_state, t, key)

  def transform_grads(self, grads: Params, params: Params, client_state: PyTree) -> Params:
    if self.phase == FINETUNE:
      return super().transform_grads(grads, params, client_state)
    return grads

  def post_step(self, params: Params, opt_state: PyTree, client_state: PyTree
                ) -> tuple[Params, PyTree, PyTree]:
    if self.phase == FINETUNE:
      return super().post_step(params, opt_state, client_state)
    return params, opt_state, client_state

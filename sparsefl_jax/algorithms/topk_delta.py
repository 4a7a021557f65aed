"""Update Top-K: classic top-K sparsification of the model update before upload.

Each sampled client trains densely from the broadcast model w_t, forms its update
Δ_k = w_k − w_t and uploads only its ρ-fraction of largest-magnitude entries,
Δ̃_k = TopK_ρ(Δ_k) (uplink 'delta': the zeros are not sent; the engine counts the bytes from
the upload's non-zeros, `comm.py`). The server applies the example-weighted mean of the sparse
updates, w_{t+1} = w_t + Σ_k (n_k/n)·Δ̃_k (FedAvg over deltas, `Algorithm.finalize_aggregate`;
with a server optimizer the mean sparse delta is its pseudo-gradient). The model itself stays
dense: entries no client sends keep their previous value.

ρ = 1 − --sparsity. Scope (`--topk_delta_scope`): 'global' (default) keeps ceil(ρ·N) entries
by one threshold over all N trainable parameter entries jointly (kernels, biases, BatchNorm
scale/offset); 'layer' keeps ceil(ρ·n_l) of each parameter tensor. Thresholds are exact
(`sparsity.topk`, --topk_method, as the Top-K baseline `topk.py`): the k-th largest |Δ|, ties
with it kept, so an upload may carry a few more than k values when magnitudes tie. BatchNorm
running statistics are model state: averaged and counted on the wire like every method's.

This is the "Top-K-Weights Diff" uplink of ZeroFL without SWAT training: magnitude top-K of
the update as in Aji and Heafield ("Sparse Communication for Distributed Gradient Descent",
EMNLP 2017), applied to the whole local update. Unlike Aji and Heafield, who keep the dropped
entries as a local residual added to the next update (error feedback), the dropped part of
Δ_k is lost, as the specification states; clients hold no state across rounds here.
"""
import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable
from sparsefl_jax.algorithms.base import Algorithm, Upload, nnz_server_metrics
from sparsefl_jax.algorithms.hyper import Hyper
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk
from sparsefl_jax.types import Params, PyTree, Scalar

SCOPES = ("global", "layer")


@dataclasses.dataclass(frozen=True)
class TopKDelta(Algorithm):
  """Dense local training; each client uploads the top ρ = 1 − sparsity of its update.

  Attributes:
    sparsity: fraction of the update's entries not sent (may be traced with 'bisection' or
      'sort').
    scope: 'global' (one threshold over all parameters) or 'layer' (one per tensor).
    method: exact threshold algorithm of `sparsity.topk`.
  """
  sparsity: float = 0.9
  scope: str = "global"
  method: str = "bisection"
  uplink: str = "delta"

  name = "topk_delta"
  description = ("Update Top-K: dense local training, each client uploads the top (1-sparsity) "
                 "of |local - global|; the server adds their weighted mean")
  sparse = True
  hyperparams = (
      Hyper("topk_delta_scope", "global", "Update Top-K: one threshold over all parameters "
            "(global) or one per parameter tensor (layer).", choices=SCOPES),
  )
  metric_fields = {"nnz_params": None, "upload_density": None}

  def __post_init__(self):
    super().__post_init__()
    if self.uplink != "delta":
      raise ValueError(f"uplink={self.uplink!r}: topk_delta sends updates; accepted: 'delta'")
    traceable.check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    if self.scope not in SCOPES:
      raise ValueError(f"topk_delta_scope={self.scope!r} is not one of {list(SCOPES)}")
    topk.check_method(self.method)
    if self.method == "top_k":
      traceable.require_concrete("sparsity", self.sparsity, "topk_method='top_k' (lax.top_k "
                                 "takes a static k)", "use topk_method='bisection' or 'sort'")

  @classmethod
  def from_config(cls, config) -> "TopKDelta":
    return cls(sparsity=config.sparsity, scope=cls.hyper(config, "topk_delta_scope"),
               method=config.topk_method)

  def keep_masks(self, delta: Params) -> PyTree:
    """Which entries of Δ are sent: |Δ| ≥ the k-th largest |Δ| (globally or per tensor)."""
    density = 1.0 - self.sparsity
    if self.scope == "layer":
      return topk.layerwise_topk_masks(delta, density, method=self.method)
    return topk.global_topk_masks(delta, density, filter_fn=None, method=self.method)

  def client_upload(self, global_params: Params, local_params: Params, client_state: PyTree,
                    t: Scalar) -> Upload:
    del client_state, t
    delta = jax.tree.map(jnp.subtract, local_params, global_params)
    return Upload(masks_lib.apply_masks(delta, self.keep_masks(delta)))

  def client_metrics(self, global_params: Params, upload: Upload, client_state: PyTree
                     ) -> Dict[str, Scalar]:
    del global_params, client_state
    return {"upload_density": masks_lib.density(upload.values)}

  server_metrics = nnz_server_metrics

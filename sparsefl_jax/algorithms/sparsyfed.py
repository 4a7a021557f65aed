"""SparsyFed (Guastella et al., ICLR 2025, arXiv 2504.05153).

Clients train a Powerprop model (w = sign(v)|v|^β on every conv/dense kernel, first and last
included; BN and biases untouched), with each layer's saved input pruned in the backward pass
to the layer's current weight density (`sparsity.powerprop.PowerpropOp`); after local training
they keep the global top (1 − ŝ) of the kernels by |v| and upload the pruned weights (as the
Top-K baseline does). The server averages (FedAvg or any optax optimizer, e.g. FedAdam with
η=0.01, τ=1e-3, β1=0.9, β2=0.99 as the authors' configs) and does not re-prune.

Variants: `act_threshold='first_batch'` computes each conv layer's activation threshold on
the first local batch of the round and reuses it, while dense layers keep an exact top-K per
batch (as the authors' code: its conv modules cache the threshold, its linear modules do
not); 'first_batch_all' caches it for every layer. `spectral=True` replaces β by a per-layer
β_ℓ = 1 + mean(|W_ℓ|/σ_max(|W_ℓ|)) recomputed each round from the received global model,
the mean over the non-zero entries (release code) or all (`spectral_average`); ranking for
the upload top-K then uses |v|, as the code does.
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable
from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.algorithms.topk import TopK
from sparsefl_jax.sparsity import powerprop, swat
from sparsefl_jax.tree_paths import layer_kernel, weight_layers


@dataclasses.dataclass(frozen=True)
class SparsyFed(TopK):
  """Powerprop + activation pruning + top-K upload; `beta` and `sparsity` may be traced."""
  beta: float = 1.25
  spectral: bool = False
  act_threshold: str = "per_batch"
  spectral_average: str = "nonzero"
  layers: Tuple[str, ...] = ()     # bound by setup(): every weight layer, in call order
  cached_layers: Tuple[str, ...] = ()   # bound by setup(): layers with a first-batch threshold

  name = "sparsyfed"
  description = "SparsyFed: Powerprop + activation pruning, global top-K before upload"
  needs_setup = True   # the weight layers (call order) and the cached ones come from setup()

  def __post_init__(self):
    if self.method == "top_k":   # the activation density is traced (it depends on w)
      object.__setattr__(self, "method", "bisection")
    super().__post_init__()
    traceable.check_range("beta", self.beta, 1)
    if self.act_threshold not in powerprop.ACT_THRESHOLDS:
      raise ValueError(f"act_threshold={self.act_threshold!r} is not one of "
                       f"{list(powerprop.ACT_THRESHOLDS)}")
    if self.spectral_average not in powerprop.SPECTRAL_AVERAGES:
      raise ValueError(f"spectral_average={self.spectral_average!r} is not one of "
                       f"{list(powerprop.SPECTRAL_AVERAGES)}")

  @classmethod
  def from_config(cls, config) -> "SparsyFed":
    return cls(sparsity=config.sparsity, method=config.topk_method, beta=config.beta,
               spectral=config.spectral_exponent, act_threshold=config.act_threshold,
               spectral_average=config.spectral_average,
               structure=config.sparsity_structure, block_size=config.block_size)

  def init_params(self, params, key):
    del key
    return params if self.spectral else powerprop.init_kernels(params, self.beta)

  def setup(self, params, layer_order) -> Tuple[Algorithm, powerprop.PowerpropOp]:
    shapes = weight_layers(params, layer_order)
    cached = ()
    if self.act_threshold == "first_batch_all":
      cached = tuple(shapes)
    elif self.act_threshold == "first_batch":   # conv kernels (ndim > 2) only
      cached = tuple(name for name, shape in shapes.items() if len(shape) > 2)
    bound = self.bind(layers=tuple(layer_order), cached_layers=cached)
    return bound, powerprop.PowerpropOp(self.beta, act_pruning=True, method=self.method)

  def _betas(self, params) -> dict:
    self.require_bound("spectral exponents")
    return {name: powerprop.spectral_exponent(layer_kernel(params, name),
                                              average=self.spectral_average)
            for name in weight_layers(params, self.layers)}

  def client_context(self, global_params, algo_state, t):
    """The spectral exponents depend only on the broadcast model: computed once per round."""
    del algo_state, t
    return {"betas": self._betas(global_params)} if self.spectral else {}

  def client_init(self, global_params, algo_state, t, key):
    del global_params, t, key
    self.require_bound("client_init")
    state = {}
    if self.spectral:
      state["betas"] = algo_state["betas"]
    if self.cached_layers:
      zero = jnp.zeros((), jnp.float32)
      state["thr"] = {name: {"thr_w": zero, "thr_a": zero} for name in self.cached_layers}
    return state

  def forward(self, model, params, model_state, x, *, train, example_mask, rngs, client_state,
              step=None):
    self.require_bound("forward")
    extra = {}
    if self.spectral:
      betas = client_state["betas"] if train else self._betas(params)
      extra[powerprop.BETA_COLLECTION] = powerprop.beta_variables(betas)
    use_cache = train and bool(self.cached_layers) and step is not None
    if train:
      extra[swat.ROWS_COLLECTION] = swat.row_mask_variables(self.layers, example_mask)
    if use_cache:   # layers outside the cache collection compute their threshold per batch
      dens = tuple((name, 0.0) for name in self.cached_layers)
      extra[swat.COLLECTION] = swat.cache_variables(dens, step.index == 0,
                                                    client_state["thr"])
    logits, new_state, new_extra = self.apply_model(
        model, params, model_state, x, train=train, example_mask=example_mask, rngs=rngs,
        extra_collections=extra, mutable_extra=[swat.COLLECTION] if use_cache else [])
    if use_cache:
      client_state = dict(client_state,
                          thr=swat.cached_thresholds(new_extra[swat.COLLECTION], dens))
    return logits, new_state, client_state

"""ZeroFL (Qiu et al., ICLR 2022) and vanilla SWAT-FL.

Clients train with SWAT at sparsity sp (see `sparsity.swat`), then upload the top
ρ = 1 − sp + r_mask fraction, per layer, of the SWAT-sparse layers; every other tensor is sent
whole (Qiu et al. 2022, §3.2). Three uplink strategies (Algorithm 1):

  topk_weights          send TopK_ρ(w_k)                       w' = Σ (n_k/n) w̃_k
  diff_on_topk_weights  send (w_k − w_t) at TopK_ρ(|w_k|)      w' = w_t + Σ (n_k/n) d̃_k
  topk_weights_diff     send TopK_ρ(w_k − w_t)                 w' = w_t + Σ (n_k/n) d̃_k

and `dense` (the whole model: vanilla SWAT-FL, the `--algorithm=swat` default). Top-K scope is
per layer as in the paper (the SparsyFed re-implementation's global top-K is a deviation).
"""
import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable
from sparsefl_jax.algorithms.base import Algorithm, Upload
from sparsefl_jax.sparsity import swat, topk
from sparsefl_jax.sparsity.metrics import global_mask_metrics, regrowth_metrics
from sparsefl_jax.tree_paths import is_kernel, kernel_layer, layer_kernel, path_str

STRATEGIES = ("topk_weights", "diff_on_topk_weights", "topk_weights_diff", "dense")
DEFAULT_TOPK_PERIOD = 10   # SWAT's CIFAR configs (U/ERK; the authors' yaml files)


@dataclasses.dataclass(frozen=True)
class ZeroFL(Algorithm):
  """SWAT local training + a top-K uplink; see the module docstring.

  Attributes:
    sparsity: SWAT sparsity sp of the sparse layers (weights and activations).
    mask_ratio: r_mask; clients upload the top (1 − sp + r_mask) of each sparse layer.
    strategy: one of STRATEGIES.
    sparse_layers: 'default' (ZeroFL's choice), 'all', or comma-separated layer paths.
    distribution: 'uniform' (SWAT-U) or 'erk' (SWAT-ERK) per-layer sparsities.
    method: exact threshold algorithm of `sparsity.topk`.
    topk_period: recompute SWAT's thresholds every N local steps (cached in between; the
      step-0 weight thresholds are computed once per round for all clients). 0 = SWAT's CIFAR
      setting: 10 for unstructured masks, 1 (exact every step) for block masks.

  Traced values (a vmapped sweep): `mask_ratio` with method 'bisection' or 'sort'; `sparsity`
  too with, in addition, distribution 'uniform' and structure 'unstructured' (ERK solves the
  per-layer densities in Python; block SWAT takes lax.top_k's static k).
  """
  sparsity: float = 0.9
  mask_ratio: float = 0.0
  strategy: str = "topk_weights"
  sparse_layers: str = "default"
  distribution: str = "uniform"
  method: str = "bisection"
  topk_period: int = 0
  structure: str = "unstructured"
  block_size: int = 32
  matmul_impl: str = "xla"
  layer_densities: Tuple[Tuple[str, float], ...] = ()   # bound by setup()

  name = "zerofl"
  description = "ZeroFL: SWAT local training + top-(1-sparsity+mask_ratio) sparse upload"
  needs_setup = True   # the sparse layers and their densities depend on the call order
  sparse = supports_block = supports_pallas = reads_sparse_layers = True
  downlink_encoding = "dense"   # ZeroFL compresses the uplink only; the global model goes dense

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"uplink={self.strategy!r} is not one of {list(STRATEGIES)}")
    traceable.check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    if (not traceable.is_traced(self.mask_ratio, self.sparsity)
        and not 0.0 <= self.mask_ratio <= self.sparsity):
      raise ValueError(f"mask_ratio={self.mask_ratio} must lie in [0, sparsity="
                       f"{self.sparsity}]")
    traceable.check_range("mask_ratio", self.mask_ratio, 0)   # sparsity traced: the rest
    self._check_traced()
    if self.topk_period < 0:
      raise ValueError(f"topk_period={self.topk_period} must be >= 0 (0 = SWAT's default)")
    if self.topk_period == 0:
      object.__setattr__(self, "topk_period",
                         DEFAULT_TOPK_PERIOD if self.structure == "unstructured" else 1)
    if self.topk_period > 1 and self.structure != "unstructured":
      raise ValueError(f"topk_period={self.topk_period} caches element thresholds; with "
                       f"sparsity_structure={self.structure!r} use topk_period=1")
    swat.SwatOp((), structure=self.structure, matmul_impl=self.matmul_impl)  # validates
    kind = "delta" if self.strategy.startswith(("diff", "topk_weights_diff")) else "weights"
    object.__setattr__(self, "uplink", kind)
    super().__post_init__()

  def _check_traced(self) -> None:
    """One-line errors where a traced sparsity / mask_ratio meets a setting needing a number."""
    if self.method == "top_k":
      for name in ("sparsity", "mask_ratio"):
        traceable.require_concrete(name, getattr(self, name), "topk_method='top_k' (lax.top_k "
                                   "takes a static k)", "use topk_method='bisection' or 'sort'")
    if self.distribution != "uniform":
      traceable.require_concrete("sparsity", self.sparsity, f"sparsity_distribution="
                                 f"{self.distribution!r} (per-layer densities are solved in "
                                 "Python)", "use sparsity_distribution='uniform'")
    if self.structure != "unstructured":
      traceable.require_concrete("sparsity", self.sparsity, f"sparsity_structure="
                                 f"{self.structure!r} (block SWAT takes lax.top_k's static k)",
                                 "use sparsity_structure='unstructured'")

  @classmethod
  def from_config(cls, config) -> "ZeroFL":
    return cls(sparsity=config.sparsity, mask_ratio=config.mask_ratio, strategy=config.uplink,
               sparse_layers=config.sparse_layers, distribution=config.sparsity_distribution,
               method=config.topk_method, topk_period=config.topk_period,
               structure=config.sparsity_structure, block_size=config.block_size,
               matmul_impl=config.matmul_impl)

  def layer_upload_density(self, swat_density: float) -> float:
    """ρ_ℓ = 1 − sp_ℓ + r_mask for a layer trained at SWAT density d_ℓ = 1 − sp_ℓ (ERK gives
    each layer its own sp_ℓ; uniform gives every layer 1 − sp + r_mask). A traced density or
    r_mask gives a traced ρ_ℓ."""
    if traceable.is_traced(swat_density, self.mask_ratio):
      return jnp.minimum(1.0, swat_density + self.mask_ratio)
    return min(1.0, swat_density + self.mask_ratio)

  def setup(self, params, layer_order):
    dens = swat.layer_densities(params, self.sparsity, self.sparse_layers, self.distribution,
                                layer_order)
    op = swat.SwatOp(dens, self.method, self.structure, self.block_size, self.matmul_impl)
    return self.bind(layer_densities=dens), op

  def densities(self) -> Tuple[Tuple[str, float], ...]:
    """((layer path, SWAT density), ...) as bound by setup(); raises when unbound (the
    densities are a model fact read in call order, never re-derived from parameter names)."""
    self.require_bound("densities")
    return self.layer_densities

  # ---- threshold caching ------------------------------------------------------------------
  # Unstructured SWAT trains through the 'swat' threshold cache: activation thresholds are
  # recomputed every `topk_period` steps, weight thresholds too except on step 0, where every
  # client holds the broadcast model: those come from `client_context`, computed once per
  # round for all clients (the same numbers each client would compute, without K-fold cost).
  def _caches(self) -> bool:
    return self.structure == "unstructured"

  def client_context(self, global_params, algo_state, t):
    del t
    if not self._caches():
      return algo_state
    return {name: topk.topk_threshold(layer_kernel(global_params, name), d, self.method)
            for name, d in self.densities()}

  def client_init(self, global_params, algo_state, t, key):
    del t, key
    if not self._caches():
      return ()
    zero = jnp.zeros((), jnp.float32)
    return {name: {"thr_w": algo_state[name], "thr_a": zero}
            for name, _ in self.densities()}

  def forward(self, model, params, model_state, x, *, train, example_mask, rngs, client_state,
              step=None):
    if not train or step is None:
      return super().forward(model, params, model_state, x, train=train,
                             example_mask=example_mask, rngs=rngs, client_state=client_state,
                             step=step)
    dens = self.densities()
    extra = {swat.ROWS_COLLECTION: swat.row_mask_variables([n for n, _ in dens],
                                                           example_mask)}
    if self._caches():
      # SWAT refreshes when the batch index WITHIN the epoch divides the period, so the
      # schedule does not depend on the padded length (other clients' sizes).
      refresh = (step.batch % self.topk_period) == 0
      extra[swat.COLLECTION] = swat.cache_variables(dens, refresh, client_state,
                                                    refresh_w=refresh & (step.index > 0))
    logits, new_state, new_extra = self.apply_model(
        model, params, model_state, x, train=True, example_mask=example_mask, rngs=rngs,
        extra_collections=extra, mutable_extra=[swat.COLLECTION] if self._caches() else [])
    if not self._caches():
      return logits, new_state, client_state
    return logits, new_state, swat.cached_thresholds(new_extra[swat.COLLECTION], dens)

  # ---- uplink ------------------------------------------------------------------------------
  def _upload_masks(self, scores):
    """Per-layer top-ρ masks of `scores` on the SWAT-sparse kernels; all-True elsewhere."""
    rho = {name: self.layer_upload_density(d) for name, d in self.densities()}

    def density_of(key_path, leaf):
      path = path_str(key_path)
      is_sparse_kernel = is_kernel(path, leaf) and kernel_layer(path) in rho
      return rho[kernel_layer(path)] if is_sparse_kernel else None

    dens = jax.tree_util.tree_map_with_path(density_of, scores)
    return topk.layerwise_topk_masks(scores, dens, self.method)

  def client_upload(self, global_params, local_params, client_state, t):
    del client_state, t
    if self.strategy == "dense":
      return Upload(local_params)
    diff = jax.tree.map(jnp.subtract, local_params, global_params)
    scores = diff if self.strategy == "topk_weights_diff" else local_params
    masks = self._upload_masks(scores)
    sent = local_params if self.strategy == "topk_weights" else diff
    return Upload(jax.tree.map(lambda v, m: jnp.where(m, v, 0.0), sent, masks))

  def client_metrics(self, global_params, upload, client_state) -> Dict[str, jax.Array]:
    del client_state
    leaves = jax.tree.leaves(upload.values)
    nnz = sum(jnp.sum(l != 0) for l in leaves)
    model = upload.values if self.uplink == "weights" else jax.tree.map(
        jnp.add, global_params, upload.values)
    return {"upload_density": nnz / sum(l.size for l in leaves),
            **regrowth_metrics(global_params, model)}

  def server_metrics(self, old_params, new_params, algo_state):
    del algo_state
    return global_mask_metrics(old_params, new_params)


@dataclasses.dataclass(frozen=True)
class SwatFL(ZeroFL):
  """Vanilla SWAT-FL: SWAT local training, whole model uploaded (ZeroFL with r_mask = sp)."""
  strategy: str = "dense"

  name = "swat"
  description = "SWAT-FL: top-K sparse weights/activations in local training, dense upload"

  @classmethod
  def from_config(cls, config) -> "SwatFL":
    base = ZeroFL.from_config(config)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ZeroFL)
              if f.name not in ("uplink", "strategy", "layer_densities")}
    return cls(**fields)

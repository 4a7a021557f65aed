"""Powerpropagation (Schwarz et al. 2021) and SparsyFed's layer-wise activation pruning.

Powerprop stores v and uses w = sign(v)·|v|^β (= v·|v|^(β−1)) in the forward pass, so
∂L/∂v = β·|v|^(β−1)·∂L/∂w: entries with v = 0 get exactly zero gradient when β > 1 and
cannot regrow locally. Initialisation v = sign(u)·|u|^(1/β) makes w follow the standard init.

SparsyFed (Guastella et al. 2025, §3) additionally prunes each sparse layer's SAVED input in the
backward pass to density 1 − s_ℓ, where s_ℓ is the fraction of exact zeros of that layer's
weights; the forward pass uses the dense input. This reuses SWAT's custom VJP
(`swat.swat_contract`) with a zero weight threshold (the weights are already sparse). The
activation threshold is either an exact top-K per batch, or computed on the first local batch
of the round and reused (the authors' conv behaviour), kept in the same cached 'swat'
collection SWAT uses for `topk_period`.
"""
import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax.sparsity import swat
from sparsefl_jax.tree_paths import is_kernel, module_path, nest_by_layer, path_str
from sparsefl_jax.types import Params

ACT_THRESHOLDS = ("per_batch", "first_batch", "first_batch_all")
SPECTRAL_AVERAGES = ("nonzero", "all")
BETA_COLLECTION = "powerprop"


@jax.custom_jvp
def reparam(v: jax.Array, beta) -> jax.Array:
  """w = sign(v)·|v|^β with dw/dv = β·|v|^(β−1), which is exactly 0 at v = 0 for β > 1.

  A custom JVP because autodiff of v·|v|^(β−1) evaluates 0·∞ = NaN at v = 0 when β < 2.
  β is treated as a constant (no gradient flows to it).
  """
  return jnp.sign(v) * jnp.power(jnp.abs(v), beta)


@reparam.defjvp
def _reparam_jvp(primals, tangents):
  v, beta = primals
  v_dot, _ = tangents
  return reparam(v, beta), beta * jnp.power(jnp.abs(v), beta - 1.0) * v_dot


def inverse_reparam(w: jax.Array, beta) -> jax.Array:
  """v = sign(w)·|w|^(1/β): the Powerprop initialisation from a standard init w."""
  return jnp.sign(w) * jnp.power(jnp.abs(w), 1.0 / beta)


def init_kernels(params: Params, beta: float) -> Params:
  """Applies the Powerprop initialisation to every kernel; biases/BN stay as they are."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: inverse_reparam(x, beta) if is_kernel(path_str(p), x) else x, params)


def spectral_exponent(v: jax.Array, iterations: int = 20, average: str = "nonzero"
                      ) -> jax.Array:
  """β = 1 + mean(A / σ_max(A)) with A = |v| reshaped to (out, −1) (SparsyFed, Guastella et
  al. 2025, hyperparameter-free variant).

  `average`: 'nonzero' takes the mean over A's non-zero entries (the authors' release code;
  the paper does not say), 'all' over every entry (their later code). On a sparse layer
  'nonzero' gives the larger β. σ_max by power iteration from the all-ones vector (A ≥ 0, so
  this converges to the Perron vector); the release code's single random iteration and its
  sign-destroying rescale are not reproduced. An all-zero layer gets β = 1.
  """
  if average not in SPECTRAL_AVERAGES:
    raise ValueError(f"spectral_average={average!r} is not one of {list(SPECTRAL_AVERAGES)}")
  a = jnp.abs(v).reshape(-1, v.shape[-1]).T          # (out, fan_in)
  u = jnp.ones((a.shape[1],), a.dtype)

  def body(_, u):
    u = a.T @ (a @ u)
    return u / jnp.maximum(jnp.linalg.norm(u), 1e-12)

  u = jax.lax.fori_loop(0, iterations, body, u / jnp.linalg.norm(u))
  sigma = jnp.linalg.norm(a @ u)
  if average == "all":
    mean = jnp.mean(a)
  else:
    mean = jnp.sum(a) / jnp.maximum(jnp.count_nonzero(a), 1).astype(a.dtype)
  return jnp.where(sigma > 0, 1.0 + mean / jnp.maximum(sigma, 1e-12), 1.0)


@dataclasses.dataclass(frozen=True)
class PowerpropOp:
  """A `models.LinearOp`: Powerprop weights, and (optionally) SparsyFed's activation pruning.

  Attributes:
    beta: the exponent β (≥ 1; may be a traced scalar). When the model is applied with a
      'powerprop' collection holding a per-layer `beta`, that value is used instead
      (spectral-exponent variant).
    act_pruning: prune the saved input to density 1 − s_ℓ in the backward pass.
    method: exact threshold algorithm ('bisection' or 'sort': the density is traced).
    layers: module paths the op applies to (empty = every weight layer).
  """
  beta: float = 1.25
  act_pruning: bool = True
  method: str = "bisection"
  layers: Tuple[str, ...] = ()

  def __call__(self, module, contract, x, kernel):
    path = module_path(module)
    if self.layers and path not in self.layers:
      return contract(x, kernel)
    beta = self.beta
    if module.has_variable(BETA_COLLECTION, "beta"):
      beta = module.get_variable(BETA_COLLECTION, "beta")
    w = reparam(kernel, beta)
    if not self.act_pruning:
      return contract(x, w)
    density = 1.0 - jnp.mean(jax.lax.stop_gradient(w) == 0, dtype=jnp.float32)
    compute = lambda: swat.activation_threshold(module, x, density, self.method)
    if module.has_variable(swat.COLLECTION, "refresh"):
      refresh = module.get_variable(swat.COLLECTION, "refresh")
      cached = module.get_variable(swat.COLLECTION, "thr_a")
      thr_a = jax.lax.cond(refresh, compute, lambda: cached)
      if module.is_mutable_collection(swat.COLLECTION):
        module.put_variable(swat.COLLECTION, "thr_a", thr_a)
    else:
      thr_a = compute()
    return swat.swat_contract(contract, x, w, jnp.ones_like(w), thr_a)


def beta_variables(betas: dict) -> dict:
  """Nested 'powerprop' collection {layer path parts...: {'beta': β_ℓ}} from {path: β_ℓ}."""
  return nest_by_layer({name: {"beta": b} for name, b in betas.items()})

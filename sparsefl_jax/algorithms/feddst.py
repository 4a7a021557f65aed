"""FedDST (Bibikar, Vikalo, Wang and Chen, "Federated Dynamic Sparse Training: Computing
Less, Communicating Less, Yet Learning Better", AAAI 2022).

The model keeps a fixed sparsity S (= --sparsity) over the conv/dense kernels (every leaf
`tree_paths.is_kernel` accepts; the official code masks the `weight` of every conv/linear
layer, first and last included), spread over the layers by Erdős–Rényi-Kernel densities d_l
(`sparsity.distributions.erk`, the same ERK as SWAT-ERK); layer l holds k_l = ceil(d_l·n_l)
weights. Biases and BatchNorm are never pruned.

* Initial mask: the k_l largest |w| of each initialised kernel. The official code prunes the
  random initialisation by magnitude, layer-wise, so the mask is as random as the init and
  needs no key of its own (`init_params`, deterministic in the model's init seed).
* Local training inside the client's mask (`MaskedTraining`).
* Readjustment rounds follow the official code's 0-based round index s = t − 1: rounds with
  (s − 1) mod R_adj = 0 and α_s > 0, i.e. t = 2, 2 + R_adj, ... up to t_end (with R_adj = 1,
  every round). α_s = (α/2)(1 + cos(π·s / t_end)) for s < t_end, 0 after (the code's `_decay`);
  t_end = --feddst_t_end (0: rounds // 2, the official default).
* Readjustment happens at the first step of the last local epoch (`local_update`, on that
  step's gradients): each layer keeps the floor((1 − α_s)·k_l) largest |w| of its active
  weights (global sparsity S + (1 − S)·α_s), then regrows the largest |g| among its inactive
  positions back to k_l; regrown weights start at 0 (as in the code) and train for the rest
  of the epoch.
* Upload: the masked weights and, in readjustment rounds only, the client's mask (1 bit per
  entry; the code charges the mask only when it readjusts).
* Server: each weight is the example-weighted mean over the clients whose mask holds it,
  Σ n_k m_k w_k / Σ n_k m_k (the code weights by training-set size too); it survives where
  at least max(1, min_votes) clients hold it. If the kernels end denser than S, each layer
  holding more than k_l weights is cut back to its k_l largest |w| (the code's layer-wise
  magnitude re-prune). The non-zero pattern of the result is the new global mask (the code's
  mask is the vote pattern; the two differ only where a mean is exactly 0). `server_post`
  cuts back again, so a server optimizer cannot grow the model past S either.

Where this departs from the official code (github.com/bibikar/feddst, dst.py/models.py),
for reasons given: the code readjusts after the last local epoch with the gradient of the
last batch at the final weights; no step shared by all clients has that gradient (clients'
last real batches differ, and padded steps are discarded), so here it happens at the start
of the last epoch, a step every client trains (`lax.cond` stays a cond), and the regrown
weights train for that epoch instead of being uploaded as zeros. The code's prune amount
uses the undecayed α (its decay only decides whether to readjust) and multiplies α in twice;
here the prune fraction is α_s, as in the paper. The code counts min_votes in examples
(n_k-weighted votes, strictly more than min_votes); here in clients, at least min_votes.
The code's regrowth ranks all positions (active ones included) and zeroes them; here only
inactive positions regrow, so every layer ends with exactly k_l weights.
"""
import dataclasses
import math
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax.algorithms.base import Upload, nnz_server_metrics
from sparsefl_jax.algorithms.hyper import Hyper
from sparsefl_jax.algorithms.masked import MaskedTraining
from sparsefl_jax.sparsity import distributions, topk
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.traceable import check_range
from sparsefl_jax.tree_paths import is_kernel, path_str
from sparsefl_jax.types import Params, PyTree, Scalar


class FedDSTState(NamedTuple):
  """Server state: the global mask (bool, params-shaped; non-kernels all True)."""
  mask: PyTree


def _ranks(score: jax.Array) -> jax.Array:
  """0-based rank of every entry in ascending order of `score` (ties by position)."""
  flat = score.ravel()
  order = jnp.argsort(flat, stable=True)
  return jnp.zeros(flat.shape, jnp.int32).at[order].set(
      jnp.arange(flat.size, dtype=jnp.int32)).reshape(score.shape)


def keep_largest(score: jax.Array, candidates: jax.Array, count) -> jax.Array:
  """The `count` (int, may be traced) candidates with the largest score (ties by position)."""
  masked = jnp.where(candidates, score.astype(jnp.float32), -jnp.inf)
  return candidates & (_ranks(-masked) < count)


def readjust_layer(w: jax.Array, g: jax.Array, mask: jax.Array, keep: int, alpha
                   ) -> jax.Array:
  """One layer's new mask: keep floor((1 − α)·keep) largest |w| of the active weights,
  then regrow the largest |g| among the other positions back to `keep` weights."""
  kept = jnp.floor((1.0 - alpha) * keep).astype(jnp.int32)
  survivors = keep_largest(jnp.abs(w), mask, jnp.minimum(kept, jnp.sum(mask)))
  grow = keep - jnp.sum(survivors, dtype=jnp.int32)
  return survivors | keep_largest(jnp.abs(g), ~survivors, jnp.maximum(grow, 0))


@dataclasses.dataclass(frozen=True)
class FedDST(MaskedTraining):
  """Dynamic sparse training with mask readjustment and mask-count aggregation.

  Attributes:
    sparsity: S, the kernels' sparsity (ERK over layers).
    alpha: α, the initial readjustment fraction (cosine-decayed to 0 at t_end).
    readjust_every: R_adj; readjustment rounds are t = 2, 2 + R_adj, ... while t ≤ t_end.
    t_end: the round after which α_s is 0 and readjustment stops.
    min_votes: a weight needs at least max(1, min_votes) clients holding it.
  """
  sparsity: float = 0.8
  alpha: float = 0.01
  readjust_every: int = 15
  t_end: int = 200
  min_votes: int = 0
  local_epochs: int = 1

  name = "feddst"
  description = ("FedDST: ERK-sparse dynamic sparse training, masks readjusted every R_adj "
                 "rounds (prune |w|, regrow |grad|), mean over the clients holding a weight")
  sparse = True
  hyperparams = (
      Hyper("feddst_alpha", 0.01, "FedDST: initial readjustment fraction α (cosine-decayed "
            "to 0 at feddst_t_end).", low=0.0, high=1.0),
      Hyper("feddst_readjust_every", 15, "FedDST: R_adj, rounds between mask readjustments "
            "(rounds 2, 2+R_adj, ... up to feddst_t_end, as in the official code).", low=1),
      Hyper("feddst_t_end", 0, "FedDST: last round that readjusts (α decays to 0 there); "
            "0 = rounds // 2 (the official default).", low=0),
      Hyper("feddst_min_votes", 0, "FedDST: a weight survives aggregation where at least "
            "max(1, this many) sampled clients hold it.", low=0),
  )
  metric_fields = {"nnz_params": None}

  def __post_init__(self):
    super().__post_init__()
    check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    check_range("feddst_alpha", self.alpha, 0, 1)
    check_range("feddst_readjust_every", self.readjust_every, 1)
    check_range("feddst_t_end", self.t_end, 1)
    check_range("feddst_min_votes", self.min_votes, 0)

  @classmethod
  def rounds_fixed_for(cls, config):
    if cls.hyper(config, "feddst_t_end") == 0:
      return ("FedDST's feddst_t_end=0 ends mask readjustment at round --rounds // 2 (set "
              "--feddst_t_end to decouple them)")
    return None

  @classmethod
  def from_config(cls, config) -> "FedDST":
    t_end = cls.hyper(config, "feddst_t_end") or max(config.rounds // 2, 1)
    return cls(sparsity=config.sparsity, alpha=cls.hyper(config, "feddst_alpha"),
               readjust_every=cls.hyper(config, "feddst_readjust_every"), t_end=t_end,
               min_votes=cls.hyper(config, "feddst_min_votes"),
               local_epochs=config.local_epochs)

  # ---- layer budgets ---------------------------------------------------------------------
  def layer_counts(self, params: Params) -> PyTree:
    """k_l = ceil(d_l·n_l) per kernel (ERK densities at S); None for unpruned leaves."""
    densities = distributions.to_densities(
        distributions.erk(params, float(self.sparsity), filter_fn=is_kernel))
    return jax.tree.map(lambda d, p: None if d is None else topk.num_to_keep(
        int(math.prod(jnp.shape(p))), d), densities, params, is_leaf=lambda v: v is None)

  def magnitude_mask(self, params: Params, active: PyTree) -> PyTree:
    """Each kernel cut to its k_l largest |w| among `active`; other leaves all True."""
    def one(k, p, a):
      if k is None:
        return jnp.ones(jnp.shape(p), jnp.bool_)
      return keep_largest(jnp.abs(p), a, min(k, int(p.size)))
    return jax.tree.map(one, self.layer_counts(params), params, active,
                        is_leaf=lambda v: v is None)

  def alpha_t(self, t: Scalar) -> jax.Array:
    """The readjustment fraction of 1-based round t: with the code's 0-based s = t − 1,
    α_s = (α/2)(1 + cos(π·s / t_end)) for s < t_end, 0 after (paper eq. for α_t)."""
    s = jnp.asarray(t, jnp.float32) - 1.0
    decayed = 0.5 * self.alpha * (1.0 + jnp.cos(jnp.pi * s / self.t_end))
    return jnp.where(s < self.t_end, decayed, 0.0)

  def is_readjust_round(self, t: Scalar) -> jax.Array:
    """Whether clients readjust in round t: (s − 1) mod R_adj = 0 and α_s > 0 (s = t − 1)."""
    s = jnp.asarray(t, jnp.int32) - 1
    return ((s - 1) % self.readjust_every == 0) & (self.alpha_t(t) > 0)

  # ---- server ------------------------------------------------------------------------------
  def init_params(self, params: Params, key) -> Params:
    del key
    return masks_lib.apply_masks(params, self.magnitude_mask(params, masks_lib.keep_all(params)))

  def init_state(self, params: Params) -> FedDSTState:
    # `params` went through init_params: the non-zero kernel entries are the initial mask.
    return FedDSTState(_kernel_mask(params))

  def upload_stats(self, upload: Upload) -> Tuple[PyTree, PyTree]:
    held = jax.tree.map(lambda m: m.astype(jnp.float32), upload.mask)
    return (upload.values, held), upload.mask

  def finalize_aggregate(self, global_params: Params, mean: PyTree, counts: PyTree,
                         num_clients: int, algo_state: FedDSTState, t: Scalar) -> Params:
    del global_params, num_clients, algo_state, t
    value_mean, held_mean = mean
    need = max(1, self.min_votes)
    survive = jax.tree.map(lambda c: c >= need, counts)
    averaged = jax.tree.map(
        lambda v, h, s: jnp.where(s, v / jnp.where(h > 0, h, 1.0), 0.0).astype(v.dtype),
        value_mean, held_mean, survive)
    return masks_lib.apply_masks(averaged, self.cut_back(averaged, survive))

  def cut_back(self, params: Params, survive: PyTree) -> PyTree:
    """The surviving mask, each layer cut back to k_l when the kernels are denser than S."""
    counts = self.layer_counts(params)
    kernel_nnz = sum(jnp.sum(s, dtype=jnp.int32) for k, s in zip(
        jax.tree.leaves(counts, is_leaf=lambda v: v is None), jax.tree.leaves(survive))
        if k is not None)
    budget = sum(jax.tree.leaves(counts))
    # The server's count is unbatched: a real cond, so rounds within budget skip the sorts.
    return jax.lax.cond(kernel_nnz > budget, lambda: self.magnitude_mask(params, survive),
                        lambda: survive)

  def server_post(self, params: Params, algo_state: FedDSTState, t: Scalar
                  ) -> tuple[Params, FedDSTState]:
    del algo_state, t
    # The aggregate's non-zeros are the new global mask. Without a server optimizer the cut
    # back is a no-op (finalize_aggregate did it); with one, it projects the step back to S.
    mask = self.cut_back(params, _kernel_mask(params))
    return masks_lib.apply_masks(params, mask), FedDSTState(mask)

  server_metrics = nnz_server_metrics

  # ---- client ------------------------------------------------------------------------------
  def readjusted_mask(self, params: Params, grads: Params, mask: PyTree, t: Scalar) -> PyTree:
    """Every kernel's mask after pruning α_t of it by |w| and regrowing by |g| (see module)."""
    alpha = self.alpha_t(t)

    def one(k, w, g, m):
      if k is None:
        return m
      return readjust_layer(w, g, m, min(k, int(w.size)), alpha)
    return jax.tree.map(one, self.layer_counts(params), params, grads, mask,
                        is_leaf=lambda v: v is None)

  def local_update(self, grads: Params, params: Params, opt_state: PyTree,
                   client_state: PyTree, step: Any
                   ) -> Tuple[Params, Params, PyTree, PyTree]:
    now = (self.is_readjust_round(step.round) & (step.epoch == self.local_epochs - 1)
           & (step.batch == 0))
    # Only a readjustment changes the mask; then the pruned weights are zeroed here (every
    # other step, post_step has already kept the params inside the mask).
    params, mask = jax.lax.cond(
        now, lambda: self._readjust(params, grads, client_state, step.round),
        lambda: (params, client_state))
    return masks_lib.apply_masks(grads, mask), params, opt_state, mask

  def _readjust(self, params: Params, grads: Params, mask: PyTree, t: Scalar
                ) -> Tuple[Params, PyTree]:
    new = self.readjusted_mask(params, grads, mask, t)
    return masks_lib.apply_masks(params, new), new

  def client_upload(self, global_params: Params, local_params: Params, client_state: PyTree,
                    t: Scalar) -> Upload:
    del global_params
    return Upload(masks_lib.apply_masks(local_params, client_state), client_state,
                  mask_sent=self.is_readjust_round(t))


def _kernel_mask(params: Params) -> PyTree:
  """The non-zero pattern of every kernel; all True for the other leaves."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (x != 0) if is_kernel(path_str(p), x) else jnp.ones(jnp.shape(x), bool),
      params)
